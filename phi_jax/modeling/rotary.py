"""Partial rotary position embedding, computed as transformers' PhiRotaryEmbedding does.

Only the first `rotary_ndims = int(head_dim * partial_rotary_factor)` channels of each
head rotate (NeoX rotate-half); the rest pass through unchanged.

Rope types, each as transformers' modeling_rope_utils computes it: `default`, `linear`
(inv_freq / factor), `dynamic` (NTK: the base grows with the longest position once it passes
`max_position_embeddings`), `yarn` and `llama3` (fixed rescaled frequencies; yarn also scales
cos and sin), `longrope` (short or long factors by the longest position of the call, as
transformers' longrope update does, cos and sin scaled). transformers' dynamic
rope keeps state between calls (after one long call, a shorter call still past the original
length reuses the grown base); this module is stateless and equals a freshly loaded
transformers model on every call.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from phi_jax.config import PhiConfig


def _yarn(config: PhiConfig, pos_freqs: jax.Array, dim: int) -> tuple[jax.Array, float]:
    """transformers' _compute_yarn_parameters: interpolation blended into extrapolation by a linear ramp."""
    rp = config.rope_parameters
    original = rp["original_max_position_embeddings"]
    factor = rp.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1
    base = config.rope_theta

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no singular ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freq, attention_factor


def _llama3(config: PhiConfig, freq: jax.Array) -> jax.Array:
    """transformers' _compute_llama3_parameters: low frequencies / factor, a smooth blend in between."""
    rp = config.rope_parameters
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old_context = rp["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > old_context / low, freq / factor, freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return jnp.where(medium, smoothed, scaled)


def inv_freq(config: PhiConfig, seq_len: jax.Array | None = None) -> tuple[jax.Array, float]:
    """Inverse frequencies, float32 `[rotary_ndims // 2]`, and the factor that scales cos and sin.

    Args:
      seq_len: `max(position_ids) + 1` of the call (may be traced); read by `dynamic` and `longrope`.
    """
    dim = config.rotary_ndims
    rp = config.rope_parameters
    base = jnp.float32(config.rope_theta)
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    rope_type = config.rope_type
    if rope_type == "dynamic" and seq_len is not None:
        factor = rp["factor"]
        max_pos = config.max_position_embeddings
        seq = jnp.asarray(seq_len, jnp.float32)
        grown = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        base = jnp.where(seq > max_pos, grown, base)
    if rope_type == "yarn":
        return _yarn(config, base ** exponents, dim)
    if rope_type == "longrope":
        original = rp["original_max_position_embeddings"]
        factor = rp.get("factor")
        if factor is None:
            factor = config.max_position_embeddings / original
        attention_factor = rp.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = (jnp.asarray(rp[k], jnp.float32) for k in ("short_factor", "long_factor"))
        ext = short if seq_len is None else jnp.where(jnp.asarray(seq_len) > original, long, short)
        return 1.0 / (ext * base ** exponents), attention_factor
    freq = 1.0 / (base ** exponents)
    if rope_type == "linear":
        freq = freq / rp["factor"]
    if rope_type == "llama3":
        freq = _llama3(config, freq)
    return freq, 1.0


def cos_sin(config: PhiConfig, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for `position_ids: [B, T]` -> two `[B, T, rotary_ndims]` arrays in `dtype`."""
    seq_len = jnp.max(position_ids) + 1 if config.rope_type in ("dynamic", "longrope") else None
    freq, scale = inv_freq(config, seq_len)
    freqs = position_ids[..., None].astype(jnp.float32) * freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


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
