"""Streaming conversion between checkpoint layouts: Hugging Face, phi_jax Orbax, and Microsoft's originals.

Every source presents its tensors under transformers' names and layouts (`[out, in]` Linear weights);
`plan` checks the full key set and every shape against the model the config describes before anything is
written; `convert` then reads, casts and writes one tensor at a time into a temporary directory that is
renamed into place only when complete. Peak memory is about one tensor (plus one Orbax chunk when writing
Orbax); safetensors output is written straight to disk, shard by shard.

    convert("phi-2-hf", "phi-2-orbax", to="orbax", dtype="bfloat16")
    convert("phi-2-orbax", "phi-2-hf", to="hf", shard_size="2GB")
    convert("phi-2-microsoft", "phi-2-hf", to="hf")            # source layout detected
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time

import ml_dtypes
import numpy as np

from phi_jax.io import hf as checkpoint, legacy as legacy_names, orbax as orbax_io
from phi_jax.config import PhiConfig
from phi_jax.io.names import hf_key, is_buffer
from phi_jax.io.safetensors import BLOCK_BYTES, ShardedSafetensorsWriter, atomic_output_dir, tiled_copy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def parse_size(size) -> int:
    """'2GB', '500MB', '64KiB' or an int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 2GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype)


class HFSource:
    """A Hugging Face directory (config.json + safetensors / sharded safetensors / pytorch_model.bin)."""

    layout = "hf"

    def __init__(self, directory: str, config: PhiConfig | None = None):
        self.directory = os.fspath(directory)
        self.config = config or PhiConfig.from_pretrained(self.directory)
        self._w = checkpoint.CheckpointReader(self.directory)
        self.tensors = {k: (self._w.shapes[k], self._w.dtypes[k], self._w.files[k])
                        for k in self._w.shapes if not is_buffer(k)}

    def get(self, key: str, rows=None) -> np.ndarray:
        return self._w.get(key, rows)


class LegacySource:
    """Microsoft's original layouts (`layers.N.mixer.Wqkv`, `transformer.h.N.mixer.Wqkv`, `lm_head.linear`)."""

    layout = "legacy"

    def __init__(self, directory: str, config: PhiConfig | None = None):
        self.directory = os.fspath(directory)
        if config is None:
            file = os.path.join(self.directory, "config.json")
            if not os.path.exists(file):
                raise FileNotFoundError(f"no config.json at {file}; pass a config for this Microsoft checkpoint")
            with open(file) as f:
                d = json.load(f)
            config = legacy_names.legacy_config(d, file) if d.get("model_type") != "phi" else PhiConfig.from_dict(d)
        self.config = config
        self._w = checkpoint.CheckpointReader(self.directory)
        self._table = legacy_names.legacy_table(self._w.shapes, config, where=self.directory)
        c = config
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


class OrbaxSource:
    """A phi_jax Orbax directory; tensors come back in HF layout (kernels transposed as views)."""

    layout = "orbax"

    def __init__(self, directory: str, config: PhiConfig | None = None):
        self.directory = os.fspath(directory)
        self.config = config or PhiConfig.from_pretrained(self.directory)
        self._r = orbax_io.OrbaxReader(self.directory)
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


def detect_layout(directory: str) -> str:
    directory = os.fspath(directory)
    if orbax_io.is_orbax_dir(directory):
        return "orbax"
    if is_legacy_dir(directory):
        return "legacy"
    return "hf"


def is_legacy_dir(directory) -> bool:
    """True when `directory` holds a Microsoft-layout config.json (model_type phi-msft / mixformer-sequential)."""
    file = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(file):
        return False
    try:
        with open(file) as f:
            return json.load(f).get("model_type") in legacy_names.LEGACY_MODEL_TYPES
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def open_source(directory, layout: str = "auto", config: PhiConfig | None = None):
    if not os.path.isdir(os.fspath(directory)):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    layout = detect_layout(directory) if layout == "auto" else layout
    classes = {"hf": HFSource, "legacy": LegacySource, "orbax": OrbaxSource}
    if layout not in classes:
        raise ValueError(f"unknown source layout {layout!r}; expected one of {sorted(classes)}")
    return classes[layout](directory, config)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor to convert: HF key, NNX path, whether the Linear kernel transposes, HF-layout shape."""

    key: str
    path: tuple
    transpose: bool
    shape: tuple
    dtype: np.dtype
    file: str


def model_class(config: PhiConfig):
    from phi_jax.modeling.model import MODEL_CLASSES, PhiForCausalLM
    name = (config.architectures or ("PhiForCausalLM",))[0]
    return MODEL_CLASSES.get(name, PhiForCausalLM)


def plan(source, cls=None) -> list[Entry]:
    """Checks `source` against the model its config describes; returns the tensors in NNX order.

    Raises ValueError naming each missing, unexpected or mis-shaped tensor and the file holding it.
    """
    from flax import nnx
    config = source.config
    cls = cls or model_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    entries, missing, mismatched = [], [], []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, transpose = hf_key(path)
        want = tuple(var.get_value().shape)
        want = want[::-1] if transpose else want
        if key not in source.tensors:
            missing.append(key)
            continue
        shape, dtype, file = source.tensors[key]
        if tuple(shape) != want:
            mismatched.append(f"{key} in {file}: shape {list(shape)}, config expects {list(want)}")
        entries.append(Entry(key, path, transpose, want, dtype, file))
    known = {e.key for e in entries}
    unexpected = [f"{k} ({f})" for k, (_, _, f) in sorted(source.tensors.items())
                  if k not in known and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    problems = [f"{name}: {v}" for name, v in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                                ("shape mismatches", mismatched)) if v]
    if problems:
        raise ValueError(f"{source.directory}: the weights do not fit {cls.__name__} with this config "
                         f"(hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, "
                         f"vocab_size={config.vocab_size}): " + " | ".join(problems))
    return entries


def _our_layout(source, e: Entry, dtype: np.dtype) -> np.ndarray:
    """Tensor `e` in our layout and `dtype`, contiguous; a transposed kernel is filled in row blocks of the
    source, so only the output (plus one block) is ever in memory."""
    if not e.transpose:
        return np.ascontiguousarray(source.get(e.key), dtype=dtype)
    out = np.empty(e.shape[::-1], dtype)  # [in, out]
    step = max(1, BLOCK_BYTES // max(1, math.prod(e.shape[1:]) * 4))
    for r in range(0, e.shape[0], step):
        block = source.get(e.key, (r, min(r + step, e.shape[0])))  # [rows, in]
        tiled_copy(out[:, r:r + block.shape[0]], block.T)
        del block
    return out


def _config_json(config: PhiConfig, cls, dtype: np.dtype) -> bytes:
    d = config.to_dict()
    d["architectures"] = [cls.__name__]
    d["dtype"] = str(dtype)
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


def convert(src, dst, *, to: str, layout: str = "auto", dtype=None, shard_size="2GB", chunk_size="256MB",
            overwrite: bool = False, progress: bool = False, config: PhiConfig | None = None) -> dict:
    """Converts the checkpoint directory `src` into `dst`, tensor by tensor.

    Args:
      to: "hf" (config.json + model.safetensors, or shards of at most `shard_size` plus
        model.safetensors.index.json) or "orbax" (config.json + params/, saved in chunks of `chunk_size`).
      layout: the source layout, "hf", "orbax", "legacy" or "auto" (detected).
      dtype: "float32", "bfloat16", "float16" or None (keep each tensor's dtype).
      overwrite: replace an existing `dst` (otherwise FileExistsError).
      config: a PhiConfig for sources without a usable config.json.
    Returns:
      {"tensors", "bytes_read", "bytes_written", "seconds", "dst"}.
    """
    if to not in ("hf", "orbax"):
        raise ValueError(f"unknown output layout {to!r}; expected 'hf' or 'orbax'")
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if src == dst:
        raise ValueError(f"source and destination are the same directory: {src}")
    out_dtype = _dtype(dtype)
    source = open_source(src, layout, config)
    cls = model_class(source.config)
    entries = plan(source, cls)
    out = [(e, out_dtype or e.dtype) for e in entries]
    total_out = sum(math.prod(e.shape) * d.itemsize for e, d in out)
    start, read = time.perf_counter(), 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_out, unit="B", unit_scale=True, desc=f"{source.layout} -> {to}")
    with atomic_output_dir(dst, overwrite) as tmp:
        if to == "hf":
            writer = ShardedSafetensorsWriter(tmp, [(e.key, e.shape, d) for e, d in out], parse_size(shard_size))
        else:
            writer = orbax_io.OrbaxWriter(os.path.join(tmp, orbax_io.PARAMS), parse_size(chunk_size))
        try:
            for i, (e, d) in enumerate(out):
                if to == "hf":
                    arr = source.get(e.key)  # HF layout (a transposed view for Orbax sources)
                    writer.put(e.key, arr)
                else:
                    arr = _our_layout(source, e, d)
                    writer.put(e.path, arr)
                read += math.prod(e.shape) * e.dtype.itemsize
                del arr
                if bar is not None:
                    bar.update(math.prod(e.shape) * d.itemsize)
                    bar.set_postfix_str(f"{i + 1}/{len(out)} tensors")
            writer.close()
        except BaseException:
            if to == "hf":
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        dtypes = {d for _, d in out}
        with open(os.path.join(tmp, "config.json"), "wb") as f:
            f.write(_config_json(source.config, cls, dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    return {"tensors": len(out), "bytes_read": read, "bytes_written": total_out,
            "seconds": time.perf_counter() - start, "dst": dst}


def hf_to_orbax(src, dst, **kw) -> dict:
    return convert(src, dst, to="orbax", layout="hf", **kw)


def orbax_to_hf(src, dst, **kw) -> dict:
    return convert(src, dst, to="hf", layout="orbax", **kw)


def legacy_to_hf(src, dst, **kw) -> dict:
    return convert(src, dst, to="hf", layout="legacy", **kw)


def legacy_to_orbax(src, dst, **kw) -> dict:
    return convert(src, dst, to="orbax", layout="legacy", **kw)


def load_legacy(cls, path, *, dtype=None, param_dtype=None, attn_implementation="xla",
                config: PhiConfig | None = None, allow_new_head: bool = False):
    """Builds `cls` (our model) straight from a Microsoft-layout directory, one tensor at a time."""
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax.loading import _build_abstract, to_param
    if allow_new_head:
        raise ValueError("allow_new_head is only supported for Hugging Face directories")
    dtype = dtype or jnp.float32
    param_dtype = param_dtype or dtype
    source = LegacySource(path, config)
    graphdef, params, rest = _build_abstract(cls, source.config, dtype=dtype, param_dtype=param_dtype,
                                             attn_implementation=attn_implementation)
    entries = {e.path: e for e in plan(source, cls)}
    flat = nnx.to_flat_state(params)
    for p, var in flat:
        arr = source.get(entries[p].key)
        var.set_value(to_param(arr, entries[p].transpose, param_dtype))
        del arr
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def write_random_hf(directory, config: PhiConfig, *, dtype="float32", seed: int = 0, shard_size="5GB") -> str:
    """Writes a random-weight HF checkpoint of `config`'s geometry tensor by tensor (tests and benchmarks)."""
    from flax import nnx
    cls = model_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, transpose = hf_key(path)
        shape = tuple(var.get_value().shape)
        tensors.append((key, shape[::-1] if transpose else shape, _dtype(dtype)))
    os.makedirs(directory)
    writer = ShardedSafetensorsWriter(os.fspath(directory), tensors, parse_size(shard_size))
    rng = np.random.default_rng(seed)
    for key, shape, d in tensors:
        writer.put(key, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(d))
    writer.close()
    with open(os.path.join(directory, "config.json"), "wb") as f:
        f.write(_config_json(config, cls, _dtype(dtype)))
    return os.fspath(directory)
