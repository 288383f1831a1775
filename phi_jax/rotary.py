"""Partial rotary position embedding, computed as transformers' PhiRotaryEmbedding does.

Only the first `rotary_ndims = int(head_dim * partial_rotary_factor)` channels of each
head rotate (NeoX rotate-half); the rest pass through unchanged.

Rope types: `default`, `linear` (inv_freq / factor) and `dynamic` (NTK: the base grows
with the longest position once it passes `max_position_embeddings`). transformers' dynamic
rope keeps state between calls (after one long call, a shorter call still past the original
length reuses the grown base); this module is stateless and equals a freshly loaded
transformers model on every call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi_jax.config import PhiConfig


def inv_freq(config: PhiConfig, seq_len: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies, float32 `[rotary_ndims // 2]`.

    Args:
      seq_len: for `dynamic` rope, `max(position_ids) + 1` of the call (may be traced).
    """
    dim = config.rotary_ndims
    base = jnp.float32(config.rope_theta)
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    rope_type = config.rope_type
    if rope_type == "dynamic" and seq_len is not None:
        factor = config.rope_parameters["factor"]
        max_pos = config.max_position_embeddings
        seq = jnp.asarray(seq_len, jnp.float32)
        grown = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        base = jnp.where(seq > max_pos, grown, base)
    freq = 1.0 / (base ** exponents)
    if rope_type == "linear":
        freq = freq / config.rope_parameters["factor"]
    return freq


def cos_sin(config: PhiConfig, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for `position_ids: [B, T]` -> two `[B, T, rotary_ndims]` arrays in `dtype`."""
    seq_len = jnp.max(position_ids) + 1 if config.rope_type == "dynamic" else None
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq(config, seq_len)  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_partial_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first `cos.shape[-1]` channels of each head.

    Args:
      x: `[B, T, N, H]`.
      cos, sin: `[B, T, R]` with R <= H.
    Returns:
      `[B, T, N, H]`.
    """
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, R]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([x_rot, x_pass], axis=-1)
