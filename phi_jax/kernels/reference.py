"""The attention every kernel in phi_jax/kernels computes, in plain JAX: the reference for tests and the
XLA fallback.

Shared contract of `flash_attention_gpu`, `decode_attention_gpu`, `flash_attention_tpu`, `decode_attention` and this
reference (`check_shapes` gives their one-line errors for inputs outside it):

    out = f(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, q_offset=0, sm_scale=None)

  q: `[B, T, N, H]`; k, v: `[B, S, K, H]` with N a multiple of K (grouped-query attention, K/V never repeated).
  Query t sits at absolute position `q_offset + t` (prefill into a cache: queries [P, P+T) see keys [0, P+T));
  `q_offset` is a Python int >= 0 or an int32 scalar (traced or not); segment ids are integer (or bool).
  T = 0 gives an empty output, S = 0 (or B = 0) zeros.
  Query t of row b sees key s when all of
    - not causal, or s <= q_offset + t;
    - kv_segment_ids is None, or kv_segment_ids[b, s] != 0 (0 marks a padding key: left or right padding);
    - q_segment_ids is None, or q_segment_ids[b, t] == kv_segment_ids[b, s] (packed documents stay apart).
  A query that sees no key returns zeros (never NaN). Softmax statistics and accumulation are float32, the
  scale is `sm_scale` (default 1/sqrt(H)), the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(batch: int, q_len: int, kv_len: int, *, q_segment_ids=None, kv_segment_ids=None, causal: bool = True,
            q_offset=0) -> jax.Array:
    """The contract's visibility as a dense bool mask `[B, T, S]` (True = query t sees key s)."""
    mask = jnp.ones((batch, q_len, kv_len), bool)
    if causal:
        q_pos = q_offset + jnp.arange(q_len)[:, None]  # [T, 1]
        mask = mask & (jnp.arange(kv_len)[None, :] <= q_pos)[None]  # [B, T, S]
    if kv_segment_ids is not None:
        mask = mask & (kv_segment_ids != 0)[:, None, :]
        if q_segment_ids is not None:
            mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None, kv_segment_ids=None,
                        causal: bool = True, q_offset=0, sm_scale: float | None = None) -> jax.Array:
    """The contract above, materialising the `[B, K, G, T, S]` scores (float32)."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    scale = h ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST) * scale
    mask = visible(b, t, s, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                   q_offset=q_offset)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf)  # (initial: S = 0 gives zeros too)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)  # [B, K, G, T, S]
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)  # a row that sees nothing stays all zeros
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, h).astype(q.dtype)


def check_shapes(q, k, v, q_segment_ids, kv_segment_ids, name: str, q_offset=0) -> None:
    """One-line ValueErrors for inputs outside the contract (shared by the kernels' wrappers)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name}: q, k, v must be 4-D, [B, T, N, H] / [B, S, K, H], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"{name}: k {k.shape} and v {v.shape} must be [B={b}, S, K, H={h}]")
    if not (n and h and k.shape[2]):
        raise ValueError(f"{name}: heads and head_dim must be >= 1, got q {q.shape} [B, T, N, H], k {k.shape}")
    if n % k.shape[2]:
        raise ValueError(f"{name}: {n} query heads are not a multiple of {k.shape[2]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{name}: q, k, v must be floating point, got {q.dtype}")
    for arg, ids, shape in (("kv_segment_ids", kv_segment_ids, (b, k.shape[1])), ("q_segment_ids", q_segment_ids,
                                                                                    (b, t))):
        if ids is None:
            continue
        if tuple(jnp.shape(ids)) != shape:
            raise ValueError(f"{name}: {arg} has shape {jnp.shape(ids)}, expected {shape}")
        if not (jnp.issubdtype(jnp.result_type(ids), jnp.integer) or jnp.result_type(ids) == jnp.bool_):
            raise ValueError(f"{name}: {arg} must be integer (or bool) ids, got {jnp.result_type(ids)}")
    check_offset(q_offset, name)


def check_positive_ints(name: str, **values) -> None:
    """Each of `values` (a wrapper's tuning option: block size, number of splits) is None or a positive int."""
    for arg, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {arg}={value!r} must be a positive integer (or None)")


def check_offset(q_offset, name: str) -> None:
    """q_offset is a Python int or an int32 scalar array (traced or not), and not negative where it is known."""
    if isinstance(q_offset, bool) or jnp.ndim(q_offset) != 0 or not jnp.issubdtype(jnp.result_type(q_offset),
                                                                                       jnp.integer):
        raise ValueError(f"{name}: q_offset must be an int or an integer scalar (one offset for the batch), got "
                         f"{getattr(q_offset, 'dtype', type(q_offset).__name__)} of shape {jnp.shape(q_offset)}")
    try:
        value = int(q_offset)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return  # traced: its value is not known here
    if value < 0:
        raise ValueError(f"{name}: q_offset={value} must be >= 0")
