"""Checkpoint directory <-> phi_jax model: `from_pretrained` = open, plan, fill; `save_pretrained` = write.

Loading opens any supported directory as a source of named tensors (`io.sources.open_source`, which also checks
the config against the tensors), builds the model abstractly (`nnx.eval_shape`), checks every key and shape
(`io.plan.plan`) before reading any tensor, then fills each parameter from one tensor at a time (Linear kernels
copied to `[in, out]` in `param_dtype`, then placed on the device by `place`), so the host never holds two full
copies of the weights. Saving streams the parameters into a new directory beside the old one and swaps it in
(`io.atomic.atomic_output_dir`), so a directory always holds one complete checkpoint.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax.config import PhiConfig
from phi_jax.io.atomic import atomic_output_dir
from phi_jax.io.hf import is_checkpoint_file
from phi_jax.io.plan import WEIGHT_DTYPES, abstract_params, hf_layout, plan
from phi_jax.io.safetensors import ShardedSafetensorsWriter
from phi_jax.io.sources import open_source


def _check_dtype(name: str, value) -> None:
    """ValueError unless `value` is a floating dtype JAX computes in (float32, bfloat16, float16; float64 only under
    jax_enable_x64): anything else failed deep inside Flax's initialisers."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not a dtype; pass e.g. jnp.float32, jnp.bfloat16 or "
                         f"'bfloat16'") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}={dtype} is not a floating dtype; pass e.g. jnp.float32 or jnp.bfloat16")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(f"{name}={dtype} needs jax_enable_x64 (JAX computes in "
                         f"{jax.dtypes.canonicalize_dtype(dtype)})")


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for the model classes, which inherit this (no model import here)."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                        attn_implementation: str = "xla", **kwargs):
        """Loads a Hugging Face directory (config.json + safetensors / sharded safetensors / pytorch_model.bin),
        a phi_jax Orbax directory or a Microsoft-layout directory, by a relative or absolute path."""
        return load_pretrained(cls, path, dtype=dtype, param_dtype=param_dtype,
                               attn_implementation=attn_implementation, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Writes config.json + model.safetensors that transformers' PyTorch classes load."""
        save_pretrained(self, path, **kwargs)


def _build_abstract(cls, config, **kw):
    """(graphdef, abstract params, concrete non-param state such as dropout rng keys)."""
    graphdef, params = abstract_params(cls, config, **kw)
    # Only the small rng state is materialised; XLA drops the unused parameter initialisers.
    rest = jax.jit(lambda: nnx.split(cls(config, rngs=nnx.Rngs(0), **kw), nnx.Param, ...)[2])()
    return graphdef, params, rest


def load_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, attn_implementation="xla",
                    allow_new_head: bool = False, progress: bool = False, config: PhiConfig | None = None,
                    mesh=None, rules=None):
    """Loads `cls` from a checkpoint directory; see PhiPreTrainedModel.from_pretrained.

    Args:
      allow_new_head: initialise a classification head (`score`) that the checkpoint lacks (as when
        fine-tuning a classifier from a causal-LM checkpoint) instead of raising.
      config: a PhiConfig to use instead of the directory's config.json (checked against the tensors all the same).
      mesh: a `jax.sharding.Mesh` (`phi_jax.sharding.make_mesh`): each tensor goes straight into its sharding as it
        is read (every device receives only its slice), by the parameters' logical axes through `rules`
        (default `phi_jax.sharding.DEFAULT_RULES`).
    """
    _check_dtype("dtype", dtype)
    if param_dtype is not None:
        _check_dtype("param_dtype", param_dtype)
    if config is not None and not isinstance(config, PhiConfig):
        raise TypeError(f"config must be a phi_jax.PhiConfig, got {type(config).__name__}")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (phi_jax.sharding.make_mesh), got {type(mesh).__name__}")
    source = open_source(path, config=config)
    try:
        param_dtype = param_dtype or dtype
        graphdef, params, rest = _build_abstract(cls, source.config, dtype=dtype, param_dtype=param_dtype,
                                                 attn_implementation=attn_implementation)
        checked = plan(source, params, cls.__name__, allow_new_head=allow_new_head)
        put = place
        if mesh is not None:
            from phi_jax.sharding import DEFAULT_RULES, path_shardings, place as place_sharded
            shardings = path_shardings(params, mesh, DEFAULT_RULES if rules is None else rules)
            put = lambda path, host: place_sharded(host, shardings[path])  # noqa: E731
        params = fill(params, source, checked, param_dtype, progress=progress, place=put)
    finally:
        source.close()
    return nnx.merge(graphdef, params, rest)


def place(path: tuple, value: np.ndarray) -> jax.Array:
    """Puts one parameter (a host array in its final layout and dtype) on the device; the one placement step,
    which a sharded load replaces (`path` is the parameter's NNX path)."""
    return jnp.asarray(value)


def fill(params: nnx.State, source, checked, param_dtype, *, progress: bool = False, place=place) -> nnx.State:
    """Sets every parameter of the abstract `params` from `source`, one tensor at a time, as `checked` (an
    `io.plan.Plan`) maps them; new heads are drawn from N(0, initializer_range)."""
    flat = nnx.to_flat_state(params)
    variables = dict(flat)
    items = source.read_ours(checked.entries, np.dtype(param_dtype))
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="loading", unit="tensor", total=len(checked.entries))
    for entry, host in items:
        variables[entry.path].set_value(place(entry.path, host))
        del host
    key = jax.random.key(0)
    for path in checked.new_heads:
        key, sub = jax.random.split(key)
        var = variables[path]
        value = source.config.initializer_range * jax.random.normal(sub, var.get_value().shape)
        var.set_value(place(path, np.asarray(value, np.dtype(param_dtype))))
    return nnx.from_flat_state(flat)


def save_pretrained(model, path, dtype=None) -> None:
    """Writes config.json and model.safetensors that transformers loads, replacing any checkpoint at `path`.

    The new checkpoint is built in a directory beside `path`; other files there (tokenizer files, a README) are
    carried over as hard links, and the new directory is swapped in by renames, so `path` holds the old checkpoint
    or the new one, whole, at every moment: stale shards, indexes, `.bin` files or Orbax `params/` of the old one
    never survive next to the new weights, and a failed or interrupted save leaves the old one as it was.
    Tensors stream to disk one at a time (a kernel is written from a transposed view): no second copy of the
    weights is held.
    """
    if dtype is not None:
        try:
            ok = np.dtype(dtype) in WEIGHT_DTYPES
        except TypeError:
            ok = False
        if not ok:  # an integer dtype would write integer weights
            raise ValueError(f"dtype={dtype!r} is not a dtype weights are saved in; pass None (keep), jnp.float32, "
                             f"jnp.bfloat16, jnp.float16 or np.float64")
    params = nnx.state(model, nnx.Param)
    variables = dict(nnx.to_flat_state(params))
    layout = hf_layout(params)
    dtypes = [np.dtype(dtype or variables[p].get_value().dtype) for p, *_ in layout]
    with atomic_output_dir(path, overwrite=True, keep=lambda name: not is_checkpoint_file(name)) as tmp:
        writer = ShardedSafetensorsWriter(tmp, [(key, shape, d) for (_, key, _, shape), d in zip(layout, dtypes)],
                                          max_shard_bytes=1 << 62)
        try:
            for p, key, transpose, _ in layout:
                arr = np.asarray(jax.device_get(variables[p].get_value()))
                writer.put(key, arr.T if transpose else arr)
                del arr
            writer.close()
        except BaseException:
            writer.abort()
            raise
        model.config.save_pretrained(tmp, architecture=type(model).__name__,
                                     dtype=dtypes[0] if dtypes else np.float32)
