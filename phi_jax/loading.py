"""Hugging Face directory <-> phi_jax model, through the name table in hf_names.

Loading builds the model abstractly (`nnx.eval_shape`), checks the checkpoint's key set
and every shape against it before reading any tensor, then streams tensors one at a time
(transposing Linear kernels to `[in, out]` and casting to `param_dtype`), so the host
never holds two full copies of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax.io.hf import SAFE_SINGLE, CheckpointReader, atomic_write_bytes
from phi_jax.config import PhiConfig
from phi_jax.io.names import HEAD_PREFIXES, hf_key, is_buffer
from phi_jax.io.safetensors import ShardedSafetensorsWriter, contiguous

log = logging.getLogger(__name__)


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for the model classes, which inherit this (no model import here)."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                        attn_implementation: str = "xla", **kwargs):
        """Loads a Hugging Face directory (config.json + safetensors / sharded safetensors / pytorch_model.bin),
        a phi_jax Orbax directory or a Microsoft-layout directory."""
        return load_pretrained(cls, path, dtype=dtype, param_dtype=param_dtype,
                               attn_implementation=attn_implementation, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Writes config.json + model.safetensors that transformers' PyTorch classes load."""
        save_pretrained(self, path, **kwargs)


def _build_abstract(cls, config, **kw):
    """(graphdef, abstract params, concrete non-param state such as dropout rng keys)."""
    make = lambda: cls(config, rngs=nnx.Rngs(0), **kw)  # noqa: E731
    graphdef, params, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    # Only the small rng state is materialised; XLA drops the unused parameter initialisers.
    rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[2])()
    return graphdef, params, rest


def _checkpoint_key(cls, param_key: str, ckpt_keys) -> str:
    """Maps our key to the checkpoint's: a PhiModel checkpoint has no `model.` prefix, a head checkpoint does."""
    if cls.__name__ == "PhiModel":
        prefixed = "model." + param_key
        return prefixed if prefixed in ckpt_keys or param_key not in ckpt_keys else param_key
    if param_key.startswith("model.") and param_key not in ckpt_keys and param_key[6:] in ckpt_keys:
        return param_key[6:]
    return param_key


def load_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, attn_implementation="xla",
                    allow_new_head: bool = False, progress: bool = False, config: PhiConfig | None = None):
    """Loads `cls` from a Hugging Face directory; see PhiPreTrainedModel.from_pretrained.

    Args:
      allow_new_head: initialise a classification head (`score`) that the checkpoint lacks (as when
        fine-tuning a classifier from a causal-LM checkpoint) instead of raising.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path not found: {path}")
    from phi_jax import convert
    from phi_jax.io import orbax as orbax_io
    for is_layout, load in ((orbax_io.is_orbax_dir, orbax_io.load_model), (convert.is_legacy_dir, convert.load_legacy)):
        if is_layout(path):
            return load(cls, path, dtype=dtype, param_dtype=param_dtype, attn_implementation=attn_implementation,
                        allow_new_head=allow_new_head, config=config)
    config = config or PhiConfig.from_pretrained(path)
    param_dtype = param_dtype or dtype
    graphdef, params, rest = _build_abstract(cls, config, dtype=dtype, param_dtype=param_dtype,
                                             attn_implementation=attn_implementation)
    reader = CheckpointReader(path)
    ckpt = set(reader.shapes)
    flat = nnx.to_flat_state(params)
    shapes = {p: tuple(var.get_value().shape) for p, var in flat}
    plan, missing, mismatched, new_heads = [], [], [], []
    for p, var in flat:
        key, transpose = hf_key(p)
        src = _checkpoint_key(cls, key, ckpt)
        want = shapes[p]
        if src not in ckpt:
            if allow_new_head and key.startswith("score."):
                new_heads.append(p)
                continue
            missing.append(src)
            continue
        got = reader.shapes[src]
        if (got[::-1] if transpose else got) != want:
            expected = want[::-1] if transpose else want
            mismatched.append(f"{src}: checkpoint has {list(got)}, model expects {list(expected)}")
        plan.append((p, src, transpose))
    used = {src for _, src, _ in plan}
    own_heads = {k for k, _ in (hf_key(p) for p, _ in flat) if k.startswith(HEAD_PREFIXES)}
    unexpected = []
    for k in sorted(ckpt - used):
        if is_buffer(k):
            continue
        if k == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding serves as lm_head
        if k.startswith(HEAD_PREFIXES) and k not in own_heads:
            log.info("skipping %s: a head that %s does not have", k, cls.__name__)
            continue
        unexpected.append(k)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {cls.__name__} with its config: " + " | ".join(problems))

    values = {}
    items = plan
    if progress:
        from tqdm import tqdm
        items = tqdm(plan, desc="loading", unit="tensor")
    for p, src, transpose in items:
        arr = reader.get(src)
        values[p] = to_param(arr, transpose, param_dtype)
        del arr
    reader.close()
    if new_heads:
        key = jax.random.key(0)
        for p in new_heads:
            key, sub = jax.random.split(key)
            values[p] = (config.initializer_range * jax.random.normal(sub, shapes[p])).astype(param_dtype)
    for p, var in flat:
        var.set_value(values[p])
    params = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, params, rest)


def to_param(arr: np.ndarray, transpose: bool, param_dtype) -> jax.Array:
    """One checkpoint tensor as a parameter: one host copy in our layout and dtype (a transposed kernel copied
    tile by tile), then to the device."""
    return jnp.asarray(contiguous(arr.T if transpose else arr, np.dtype(param_dtype)))


def save_pretrained(model, path, dtype=None) -> None:
    """Writes config.json and model.safetensors (each atomically) that transformers loads.

    Tensors stream to disk one at a time (a kernel is written from a transposed view), so saving holds no
    second copy of the weights.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    entries = []
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transpose = hf_key(p)
        shape = tuple(var.get_value().shape)
        entries.append((key, var, transpose, shape[::-1] if transpose else shape,
                        np.dtype(dtype or var.get_value().dtype)))
    tmp = tempfile.mkdtemp(dir=path, prefix=".tmp-save-")
    try:
        writer = ShardedSafetensorsWriter(tmp, [(k, s, d) for k, _, _, s, d in entries], max_shard_bytes=1 << 62)
        for key, var, transpose, _, _ in entries:
            arr = np.asarray(jax.device_get(var.get_value()))
            writer.put(key, arr.T if transpose else arr)
            del arr
        writer.close()
        os.replace(os.path.join(tmp, SAFE_SINGLE), os.path.join(path, SAFE_SINGLE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(entries[0][4]) if entries else "float32"
    atomic_write_bytes(os.path.join(path, "config.json"), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
