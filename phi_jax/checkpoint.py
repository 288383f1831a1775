"""Reading and writing Hugging Face weight files, tensor by tensor.

`CheckpointReader` indexes a directory (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin[.index.json]) without loading
tensors, then reads them one at a time as numpy arrays. `.bin` files load with
`torch.load(weights_only=True, mmap=True)`: no untrusted pickle is executed and the
file is paged in lazily.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterator

import numpy as np

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def _load_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid weight index: {e!r}") from None
    return weight_map


def weight_files(directory: str) -> tuple[str, dict[str, str] | None]:
    """Picks the weight layout of `directory`: (kind, key -> file map or None for single files)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    for index, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        p = os.path.join(directory, index)
        if os.path.exists(p):
            return kind, {k: os.path.join(directory, v) for k, v in _load_index(p).items()}
    for single, kind in ((SAFE_SINGLE, "safetensors"), (BIN_SINGLE, "bin")):
        p = os.path.join(directory, single)
        if os.path.exists(p):
            return kind, None
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                            f"or {BIN_INDEX}")


class CheckpointReader:
    """Shapes of every tensor of a checkpoint, and each tensor on demand.

    Attributes:
      shapes: key -> shape tuple; dtypes: key -> numpy dtype name; files: key -> file path.
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
            if not os.path.exists(p):
                raise FileNotFoundError(f"weight file listed in the index is missing: {p}")
        self.shapes, self.dtypes, self.files = {}, {}, {}
        self._handles = {}
        for p in paths:
            for key, shape, dtype in self._scan(p):
                self.shapes[key], self.dtypes[key], self.files[key] = shape, dtype, p
        if weight_map is not None:
            for key, p in weight_map.items():
                if key not in self.files:
                    raise ValueError(f"index lists tensor {key!r} in {p}, but that file does not hold it")

    def _scan(self, path: str) -> Iterator[tuple[str, tuple, str]]:
        if self.kind == "safetensors":
            from safetensors import SafetensorError, safe_open
            try:
                handle = safe_open(path, framework="numpy")
            except (SafetensorError, OSError, Exception) as e:  # safetensors raises several types
                raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from None
            self._handles[path] = handle
            for key in handle.keys():
                sl = handle.get_slice(key)
                yield key, tuple(sl.get_shape()), sl.get_dtype()
        else:
            state = _torch_load(path)
            self._handles[path] = state
            for key, t in state.items():
                yield key, tuple(t.shape), str(t.dtype).replace("torch.", "")

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array (bf16 as ml_dtypes.bfloat16)."""
        path = self.files[key]
        handle = self._handles[path]
        if self.kind == "safetensors":
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise ValueError(f"cannot read tensor {key!r} from {path} (truncated or corrupt?): {e}") from None
        return _torch_to_numpy(handle[key])

    def close(self) -> None:
        self._handles.clear()


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ImportError(f"loading {path} needs torch: pip install 'phi_jax[torch]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} (truncated, corrupt or not a weights-only checkpoint): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file atomically."""
    from safetensors.numpy import save
    atomic_write_bytes(path, save(tensors, metadata=metadata or {"format": "pt"}))
