"""PhiAttention and `attend`, the one place that chooses an attention implementation.

q/k/v are `[batch, seq, heads, head_dim]` at every boundary (B T N H; keys B S K H).
Masks are bool, True = attend, shaped `[B, 1, T, S]`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.modeling.layernorm import layer_norm, make_layer_norm, matmul_precision
from phi_jax.modeling.rotary import apply_partial_rotary

ATTN_IMPLEMENTATIONS = ("xla",)


def _attend_block(q, k, v, mask, dropout):
    """Attention of one query block. q: `[B, T, N, H]`; k, v: `[B, S, K, H]`; mask: `[B, 1, T, S]`.

    A masked key never reaches a query, whatever it holds (NaN and inf included): its score is replaced by the
    float32 minimum before the softmax, so its probability is exactly 0 (exp(min - max) underflows) for every query
    that sees some key; its value is replaced by 0 wherever no query of the block sees it (padding, unwritten cache
    slots), since 0 * NaN would still be NaN. A query that sees no key gives zeros.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    precision = matmul_precision(q.dtype)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                        precision=precision) * (h ** -0.5)
    # A finite floor (not -inf): a fully masked row stays NaN-free (and is zeroed below).
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    seen = jnp.any(mask, axis=(1, 2))  # [B, S]: keys some query of this block sees
    v = jnp.where(seen[:, :, None, None], v, jnp.zeros((), v.dtype))  # [B, S, K, H]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, precision=precision)  # [B, T, K, G, H]
    sees_any = jnp.any(mask, axis=-1)[:, 0, :, None, None, None]  # [B, T, 1, 1, 1]
    out = jnp.where(sees_any, out, jnp.zeros((), out.dtype))  # a query that sees nothing: zeros
    return out.reshape(b, t, n, h)


def attend_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal: bool = False,
               dropout: Callable[[jax.Array], jax.Array] | None = None, max_blocks: int = 8,
               min_block: int = 128) -> jax.Array:
    """Plain-jnp scaled dot-product attention with grouped keys; softmax in float32.

    Args:
      q: `[B, T, N, H]`; k, v: `[B, S, K, H]` with N a multiple of K; mask: `[B, 1, T, S]` bool.
      causal: the caller promises that `mask` already hides key s > query t (T == S, no offset).
        Long sequences are then split into at most `max_blocks` query blocks, each attending only to
        the keys up to its end: about half the score and softmax work of the full square.
      dropout: applied to the attention probabilities (training only).
    Returns:
      `[B, T, N, H]` in q's dtype.
    """
    t, s = q.shape[1], k.shape[1]
    if not causal or t != s or t < 2 * min_block:
        return _attend_block(q, k, v, mask, dropout)
    block = max(min_block, -(-t // max_blocks))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outs.append(_attend_block(q[:, start:end], k[:, :end], v[:, :end], mask[:, :, start:end, :end], dropout))
    return jnp.concatenate(outs, axis=1)  # [B, T, N, H]


def get_attention_fn(attn_implementation: str):
    """Maps the `attn_implementation` string to a function, once, at construction."""
    if attn_implementation == "xla":
        return attend_xla
    raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; "
                     f"expected one of {ATTN_IMPLEMENTATIONS}")


class PhiAttention(nnx.Module):
    """Biased q/k/v/dense projections, optional per-head q/k LayerNorm, partial rotary, GQA."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, *, qk_layernorm: bool,
                 layer_norm_eps: float, attention_dropout: float, attn_implementation: str,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.attn_fn = get_attention_fn(attn_implementation)
        # float32 accumulation and output, rounded once to the compute dtype (as torch's bf16 Linear). It also keeps
        # XLA:GPU from rewriting batch-1 decode products as multiply + reduce through memory (2x slower).
        self.dtype = dtype
        linear = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, precision=matmul_precision(dtype),
                      preferred_element_type=jnp.float32, rngs=rngs)
        self.q_proj = nnx.Linear(hidden_size, num_heads * self.head_dim, **linear)
        self.k_proj = nnx.Linear(hidden_size, num_kv_heads * self.head_dim, **linear)
        self.v_proj = nnx.Linear(hidden_size, num_kv_heads * self.head_dim, **linear)
        self.dense = nnx.Linear(num_heads * self.head_dim, hidden_size, **linear)
        if qk_layernorm:
            self.q_layernorm = make_layer_norm(self.head_dim, layer_norm_eps, param_dtype, rngs)
            self.k_layernorm = make_layer_norm(self.head_dim, layer_norm_eps, param_dtype, rngs)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.attn_dropout = (nnx.Dropout(attention_dropout, deterministic=True, rngs=rngs)
                             if attention_dropout else None)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None):
        """
        Args:
          x: `[B, T, D]`; cos, sin: `[B, T, R]`; mask: `[B, 1, T, S]` bool.
          cache: optional `(k, v)`, each `[B, S, K, H]`; this call's keys are written at `cache_index`.
        Returns:
          `([B, T, D], new_cache or None)`.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).astype(self.dtype).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(x).astype(self.dtype).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x).astype(self.dtype).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        if self.q_layernorm is not None:
            q = layer_norm(self.q_layernorm, q)
            k = layer_norm(self.k_layernorm, k)
        q = apply_partial_rotary(q, cos, sin)
        k = apply_partial_rotary(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)  # [B, S, K, H]
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)  # [B, S, K, H]
            new_cache = (k, v)
        out = self.attn_fn(q, k.astype(q.dtype), v.astype(q.dtype), mask, causal=cache is None,
                           dropout=self.attn_dropout)
        return self.dense(out.reshape(b, t, self.num_heads * self.head_dim)).astype(self.dtype), new_cache
