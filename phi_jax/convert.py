"""Streaming conversion between checkpoint layouts: Hugging Face, phi_jax Orbax, and Microsoft's originals.

`convert` = open, plan, write: `io.sources.open_source` presents any directory's tensors under transformers'
names and layouts (`[out, in]` Linear weights) and checks its config against them; `io.plan.plan` (the check
`from_pretrained` uses too) matches the full key set and every shape to the model the config describes before
anything is written; then each tensor is read, cast and written in turn into a temporary directory that is
renamed into place only when complete (`io.atomic.atomic_output_dir`). Peak memory is about one tensor (plus
one Orbax chunk when writing Orbax); safetensors output is written straight to disk, shard by shard.

    convert("phi-2-hf", "phi-2-orbax", to="orbax", dtype="bfloat16")
    convert("phi-2-orbax", "phi-2-hf", to="hf", shard_size="2GB")
    convert("phi-2-microsoft", "phi-2-hf", to="hf")            # source layout detected
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time

import ml_dtypes
import numpy as np

from phi_jax.config import PhiConfig
from phi_jax.io import orbax as orbax_io
from phi_jax.io.atomic import atomic_output_dir
from phi_jax.io.plan import abstract_params, hf_layout, plan
from phi_jax.io.safetensors import ShardedSafetensorsWriter
from phi_jax.io.sources import (  # noqa: F401  (HFSource, OrbaxSource, detect_layout: convert's API before io/)
    HFSource, LegacySource, OrbaxSource, detect_layout, is_legacy_dir, open_source)

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
    """None, or one of DTYPES given by name or as a numpy / JAX dtype; ValueError naming anything else (an integer
    dtype would write integer weights)."""
    if dtype is None:
        return None
    try:
        out = DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    except (KeyError, TypeError):
        out = None
    if out not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
    return out


def model_class(config: PhiConfig):
    from phi_jax.modeling.model import MODEL_CLASSES, PhiForCausalLM
    name = (config.architectures or ("PhiForCausalLM",))[0]
    return MODEL_CLASSES.get(name, PhiForCausalLM)


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
    out_dtype = _dtype(dtype)
    source = open_source(src, layout, config)  # FileNotFoundError at once for a missing directory
    try:  # closed whatever fails (a refused destination, a mismatched plan), not only once the copy began
        return _convert_from(source, dst, to, out_dtype, shard_size, chunk_size, overwrite, progress)
    finally:
        source.close()


def _convert_from(source, dst, to, out_dtype, shard_size, chunk_size, overwrite, progress) -> dict:
    src, dst = source.directory, os.path.realpath(os.path.expanduser(os.fspath(dst)))
    if os.path.realpath(src) == dst:
        raise ValueError(f"source and destination are the same directory: {src}")
    if overwrite and os.path.commonpath([os.path.realpath(src), dst]) == dst:  # replacing dst would delete src
        raise ValueError(f"source {src} is inside {dst}, which overwriting would replace (deleting the source); choose "
                         f"another destination")
    cls = model_class(source.config)
    entries = plan(source, abstract_params(cls, source.config)[1], cls.__name__).entries
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
                    arr = source.get_ours(e, d)  # our layout ([in, out] kernels)
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
        source.config.save_pretrained(tmp, architecture=cls.__name__,
                                      dtype=dtypes.pop() if len(dtypes) == 1 else np.float32)
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


def write_random_hf(directory, config: PhiConfig, *, dtype="float32", seed: int = 0, shard_size="5GB") -> str:
    """Writes a random-weight HF checkpoint of `config`'s geometry tensor by tensor (tests and benchmarks)."""
    cls, d = model_class(config), _dtype(dtype)
    layout = hf_layout(abstract_params(cls, config)[1])
    os.makedirs(directory)
    writer = ShardedSafetensorsWriter(os.fspath(directory), [(key, shape, d) for _, key, _, shape in layout],
                                      parse_size(shard_size))
    rng = np.random.default_rng(seed)
    for _, key, _, shape in layout:
        writer.put(key, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(d))
    writer.close()
    config.save_pretrained(directory, architecture=cls.__name__, dtype=d)
    return os.fspath(directory)
