"""LayerNorm helpers: statistics in float32 (as torch does), output in the input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.modeling.partitioning import axes


def make_layer_norm(size: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """An `nnx.LayerNorm` with the config's epsilon (Flax's default differs) and exact variance."""
    return nnx.LayerNorm(size, epsilon=eps, use_fast_variance=False, dtype=jnp.float32,
                         param_dtype=param_dtype, scale_metadata=axes("norm"), bias_metadata=axes("norm"), rngs=rngs)


def matmul_precision(dtype):
    """float32 compute means float32 matmuls (no TF32 on GPUs, as PyTorch's default); else the backend's."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """Applies `norm` in float32 and casts back to `x.dtype`."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)
