"""Reading and writing Hugging Face weight files, tensor by tensor.

`CheckpointReader` indexes a directory (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin[.index.json]) without loading
tensors, then reads them one at a time as numpy arrays: safetensors with plain reads
(io.safetensors.SafetensorsFile, no mmap), `.bin` files with
`torch.load(weights_only=True, mmap=True)`: no untrusted pickle is executed and the
file is paged in lazily.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator

import numpy as np

from phi_jax.io.safetensors import SafetensorsFile

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def _load_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid weight index: {e!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path} is not a valid weight index: weight_map must map tensor names to file names")
    for key, name in weight_map.items():  # shards lie beside the index (a path elsewhere would read any file)
        if name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
            raise ValueError(f"{path}: weight_map[{key!r}] = {name!r} is not a file name beside the index")
    return weight_map


def weight_files(directory: str) -> tuple[str, dict[str, str] | None]:
    """Picks the weight layout of `directory`: (kind, key -> file map or None for single files).

    The order is transformers' (`modeling_utils._get_resolved_checkpoint_files`): model.safetensors, then
    model.safetensors.index.json, then pytorch_model.bin, then pytorch_model.bin.index.json, so a directory holding
    more than one loads the same weights in both libraries.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    broken = []
    for name, kind in ((SAFE_SINGLE, "safetensors"), (SAFE_INDEX, "safetensors"), (BIN_SINGLE, "bin"),
                       (BIN_INDEX, "bin")):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            if name.endswith(".index.json"):
                return kind, {k: os.path.join(directory, v) for k, v in _load_index(p).items()}
            return kind, None
        if _is_broken_link(p):
            broken.append(p)
    if broken:  # a Hugging Face cache snapshot copied without its blobs: say so, not "no weights"
        raise FileNotFoundError(f"{broken[0]} is a broken symlink (to {os.readlink(broken[0])})")
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                            f"or {BIN_INDEX}")


def _is_broken_link(path: str) -> bool:
    return os.path.islink(path) and not os.path.exists(path)


_WEIGHT_FILE = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin)(\.index\.json)?$")


def is_checkpoint_file(name: str) -> bool:
    """True for the names in a model directory that hold its weights or config (what a new save replaces):
    config.json, weight files and indexes, and phi_jax's Orbax `params/`; tokenizer files and the rest are not."""
    return name in ("config.json", "params") or bool(_WEIGHT_FILE.match(name))


class CheckpointReader:
    """Shapes of every tensor of a checkpoint, and each tensor (or a range of its rows) on demand.

    Attributes:
      shapes: key -> shape tuple; dtypes: key -> numpy dtype; files: key -> file path.
    """

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.kind, weight_map = weight_files(self.directory)
        if weight_map is None:
            single = SAFE_SINGLE if self.kind == "safetensors" else BIN_SINGLE
            paths = [os.path.join(self.directory, single)]
        else:
            paths = sorted(set(weight_map.values()))
        for p in paths:
            if _is_broken_link(p):
                raise FileNotFoundError(f"weight file listed in the index is a broken symlink: {p} (to "
                                        f"{os.readlink(p)})")
            if not os.path.exists(p):
                raise FileNotFoundError(f"weight file listed in the index is missing: {p}")
        self.shapes, self.dtypes, self.files = {}, {}, {}
        self._handles = {}
        for p in paths:
            for key, shape, dtype in self._scan(p):
                if key in self.files:
                    raise ValueError(f"tensor {key!r} is stored twice: in {self.files[key]} and in {p}")
                self.shapes[key], self.dtypes[key], self.files[key] = shape, dtype, p
        if weight_map is not None:
            for key, p in weight_map.items():
                if self.files.get(key) != p:
                    raise ValueError(f"index lists tensor {key!r} in {p}, but that file does not hold it")

    def _scan(self, path: str) -> Iterator[tuple[str, tuple, np.dtype]]:
        if self.kind == "safetensors":
            handle = SafetensorsFile(path)  # checks the header and that every tensor lies inside the file
            self._handles[path] = handle
            for key, (shape, dtype, _, _) in handle.entries.items():
                yield key, shape, dtype
        else:
            state = _load_bin_state(path)
            self._handles[path] = state
            for key, t in state.items():
                yield key, tuple(t.shape), _numpy_dtype(t.dtype, f"{path}: tensor {key!r}")

    def get(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor `key` (or rows [start, stop) of its first axis) as a numpy array (bf16 as ml_dtypes)."""
        handle = self._handles[self.files[key]]
        if self.kind == "safetensors":
            return handle.read(key, rows)
        t = handle[key] if rows is None else handle[key][rows[0]:rows[1]]
        return _torch_to_numpy(t)

    def close(self) -> None:
        self._handles.clear()


def _load_bin_state(path: str) -> dict:
    try:
        import torch
    except ImportError:
        from phi_jax.errors import MissingExtraError  # the command line's exit 6, not a bug report
        raise MissingExtraError(f"loading {path} needs torch: pip install 'phi_jax[torch]'") from None
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError:
        raise  # permission denied, an I/O error: the command line's exit 5, with the operating system's words
    except Exception as e:
        raise ValueError(f"cannot read {path} (truncated, corrupt or not a weights-only checkpoint): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):  # e.g. {"state_dict": {...}, "step": 3} from a training loop
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state "
                             f"dict of tensors (a model's state_dict())")
        _numpy_dtype(value.dtype, f"{path}: tensor {key!r}")
    return state


def _numpy_dtype(torch_dtype, where: str = "tensor") -> np.dtype:
    """The numpy dtype of a torch dtype; ValueError naming `where` for one numpy cannot hold (float8, complex)."""
    import ml_dtypes
    import torch
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
             torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
             torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
    if torch_dtype not in table:
        raise ValueError(f"{where} has dtype {str(torch_dtype).replace('torch.', '')}, which phi_jax does not read "
                         f"(weights must be float32, bfloat16, float16 or float64)")
    return np.dtype(table[torch_dtype])


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
