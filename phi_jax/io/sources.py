"""Every supported checkpoint directory as one thing: a source of named tensors, under transformers' names.

    source = open_source("phi-2")          # HF (single, sharded, .bin), phi_jax Orbax or Microsoft layout
    source.config                           # PhiConfig, already checked against the tensors (io.plan.check_config)
    source.tensors["lm_head.weight"]        # (shape, dtype, file), HF layout: Linear weights [out, in]
    source.get("lm_head.weight")            # numpy array in HF layout (or rows [a, b) of it)
    source.get_ours(entry, np.float32)      # the same tensor in our layout ([in, out] kernels), contiguous

`from_pretrained` (loading.py) and `convert` (convert.py) both start here, then check with `io.plan.plan`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from phi_jax.config import PhiConfig
from phi_jax.io import hf, legacy, orbax
from phi_jax.io.names import hf_key, is_buffer
from phi_jax.io.plan import check_config
from phi_jax.io.safetensors import BLOCK_BYTES, tiled_copy


class Source:
    """Named tensors of one checkpoint directory, in HF names and layout.

    Attributes:
      directory: absolute path; layout: "hf", "legacy" or "orbax"; config: the PhiConfig;
      tensors: HF key -> (shape in HF layout, numpy dtype, file holding it).
    """

    layout = ""
    directory: str
    config: PhiConfig
    tensors: dict[str, tuple[tuple, np.dtype, str]]

    def get(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `key` in HF layout (rows [start, stop) of its first axis when given)."""
        raise NotImplementedError

    def get_ours(self, entry, dtype) -> np.ndarray:
        """Tensor `entry.key` in our layout (`[in, out]` when `entry.transpose`) and `dtype`, contiguous.

        A transposed kernel is filled in row blocks of the source, so only the output plus one block is ever in
        memory.
        """
        if not entry.transpose:
            return np.ascontiguousarray(self.get(entry.key), dtype=dtype)
        rows = entry.shape[0]
        out = np.empty(entry.shape[::-1], dtype)  # [in, out]
        step = max(1, BLOCK_BYTES // max(1, math.prod(entry.shape[1:]) * 4))
        for r in range(0, rows, step):
            block = self.get(entry.key, (r, min(r + step, rows)))  # [rows, in]
            tiled_copy(out[:, r:r + block.shape[0]], block.T)
            del block
        return out

    def read_ours(self, entries, dtype):
        """Yields `(entry, get_ours(entry, dtype))` for each entry in turn (one tensor in memory at a time)."""
        for entry in entries:
            yield entry, self.get_ours(entry, dtype)

    def close(self) -> None:
        pass


class HFSource(Source):
    """A Hugging Face directory (config.json + safetensors / sharded safetensors / pytorch_model.bin)."""

    layout = "hf"

    def __init__(self, directory: str, config: PhiConfig | None = None):
        self.directory = directory
        self.config = config or PhiConfig.from_pretrained(directory)
        self._w = hf.CheckpointReader(directory)
        self.tensors = {k: (self._w.shapes[k], self._w.dtypes[k], self._w.files[k])
                        for k in self._w.shapes if not is_buffer(k)}

    def get(self, key: str, rows=None) -> np.ndarray:
        return self._w.get(key, rows)

    def close(self) -> None:
        self._w.close()


class LegacySource(Source):
    """Microsoft's original layouts (`layers.N.mixer.Wqkv`, `transformer.h.N.mixer.Wqkv`, `lm_head.linear`)."""

    layout = "legacy"

    def __init__(self, directory: str, config: PhiConfig | None = None):
        self.directory = directory
        self.config = config or read_config(directory)
        self._w = hf.CheckpointReader(directory)
        self._table = legacy.legacy_table(self._w.shapes, self.config, where=directory)
        c = self.config
        fused = c.hidden_size + 2 * c.num_key_value_heads * c.head_dim
        self.tensors = {}
        for key, (src, rows) in self._table.items():
            shape = self._w.shapes[src]
            if rows is not None:
                if shape[0] != fused:
                    raise ValueError(f"{src} in {self._w.files[src]}: fused Wqkv has {shape[0]} rows, the config "
                                     f"expects {fused} (hidden_size + 2 * kv heads * head_dim)")
                shape = (rows[1] - rows[0], *shape[1:])
            self.tensors[key] = (shape, self._w.dtypes[src], self._w.files[src])

    def get(self, key: str, rows=None) -> np.ndarray:
        src, fused = self._table[key]
        if fused is not None:
            rows = (fused[0] + rows[0], fused[0] + rows[1]) if rows is not None else fused
        return self._w.get(src, rows)

    def close(self) -> None:
        self._w.close()


def read_config(path) -> PhiConfig:
    """The PhiConfig in `path` (a config.json or its directory), in Microsoft's old layout (`n_embd`, ...) or
    transformers'."""
    path = os.path.expanduser(os.fspath(path))
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.islink(file) and not os.path.exists(file):
        raise FileNotFoundError(f"{file} is a broken symlink (to {os.readlink(file)})")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {file}; pass a config for this checkpoint")
    try:
        with open(file) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text ({e.reason})") from None
    if isinstance(d, dict) and d.get("model_type") in legacy.LEGACY_MODEL_TYPES:
        return legacy.legacy_config(d, file)
    return PhiConfig.from_pretrained(file)


class OrbaxSource(Source):
    """A phi_jax Orbax directory; tensors come back in HF layout (kernels transposed as views)."""

    layout = "orbax"

    def __init__(self, directory: str, config: PhiConfig | None = None):
        self.directory = directory
        self.config = config or PhiConfig.from_pretrained(directory)
        self._r = orbax.OrbaxReader(directory)
        self._paths = {}
        self.tensors = {}
        for path, shape in self._r.shapes.items():
            key, transpose = hf_key(path)
            self._paths[key] = (path, transpose)
            self.tensors[key] = (shape[::-1] if transpose else shape, self._r.dtypes[path], self._r.state_dir)

    def get(self, key: str, rows=None) -> np.ndarray:
        path, transpose = self._paths[key]
        arr = self._r.get(path)
        arr = arr.T if transpose else arr
        return arr if rows is None else arr[rows[0]:rows[1]]

    def get_ours(self, entry, dtype) -> np.ndarray:
        return np.ascontiguousarray(self._r.get(self._paths[entry.key][0]), dtype=dtype)  # stored in our layout

    def read_ours(self, entries, dtype, chunk_bytes: int = 256 << 20):
        """As Source.read_ours, restoring up to `chunk_bytes` of tensors per Orbax call."""
        entries, start = list(entries), 0
        while start < len(entries):
            stop, size = start, 0
            while stop < len(entries) and (stop == start or size + _nbytes(entries[stop]) <= chunk_bytes):
                size += _nbytes(entries[stop])
                stop += 1
            chunk = entries[start:stop]
            arrays = self._r.get_many([self._paths[e.key][0] for e in chunk])
            for e in chunk:
                yield e, np.ascontiguousarray(arrays.pop(tuple(map(str, self._paths[e.key][0]))), dtype=dtype)
            start = stop


def _nbytes(entry) -> int:
    return math.prod(entry.shape) * np.dtype(entry.dtype).itemsize


def is_legacy_dir(directory) -> bool:
    """True when `directory` holds a Microsoft-layout config.json (model_type phi-msft / mixformer-sequential)."""
    file = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(file):
        return False
    try:
        with open(file) as f:
            return json.load(f).get("model_type") in legacy.LEGACY_MODEL_TYPES
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON or not text: the source says which
        return False


def detect_layout(directory) -> str:
    """'orbax', 'legacy' or 'hf'."""
    directory = os.fspath(directory)
    if orbax.is_orbax_dir(directory):
        return "orbax"
    if is_legacy_dir(directory):
        return "legacy"
    return "hf"


SOURCES = {"hf": HFSource, "legacy": LegacySource, "orbax": OrbaxSource}


def checkpoint_dir(path) -> str:
    """`path` (`~` expanded) as an absolute directory; FileNotFoundError naming it when there is none (nothing is
    downloaded)."""
    absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(absolute):
        raise FileNotFoundError(f"checkpoint directory not found: {os.fspath(path)}")
    if not os.path.isdir(absolute):
        raise ValueError(f"{os.fspath(path)} is a file; expected a checkpoint directory")
    return absolute


def open_source(path, layout: str = "auto", config: PhiConfig | None = None) -> Source:
    """Opens the checkpoint directory `path` (relative or absolute) as a Source.

    Args:
      layout: "hf", "legacy", "orbax" or "auto" (detected).
      config: a PhiConfig to use instead of the directory's config.json.
    Raises:
      FileNotFoundError naming a missing directory or file; ValueError naming a corrupt file, a config field
      out of range, or a config field that does not fit the tensors (checked here, before any model is built).
    """
    directory = checkpoint_dir(path)
    layout = detect_layout(directory) if layout == "auto" else layout
    if layout not in SOURCES:
        raise ValueError(f"unknown source layout {layout!r}; expected one of {sorted(SOURCES)}")
    source = SOURCES[layout](directory, config)
    check_config(source.config, source.tensors, where=directory)
    return source
