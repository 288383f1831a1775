"""Flash-decoding for TPU in Pallas (Mosaic TPU): a few query tokens against a long KV cache, with the contract
of `phi_jax.kernels.reference` (`attention_reference` is its reference).

    decode_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, q_offset=0,
                     sm_scale=None, block_k=None, num_splits=None, interpret=False)

A decode step has T = 1 (or a few) queries, so the work is reading the cache. The keys are cut into
`num_splits` contiguous ranges that run as parallel grid steps; each keeps its own running max / sum /
accumulator over its key blocks (flash attention's online softmax), writes the unnormalised partial output with
its statistics, and a small XLA combine rescales the partials to the common max and divides once.

Grid (B, K, splits, blocks per split). The G = N / K query heads that share a key/value head and the T queries
are stacked as the rows of one `[G*T, H]` tile (row g*T + t), so each key block is read once per key head and
multiplied against all of its queries (grouped-query attention without repeating K/V). With `causal`, key
blocks after the last query position (q_offset + T - 1) are skipped and their index maps clamped, so slots of
a preallocated cache that are not written yet are never read. Valid keys per sequence come from
`kv_segment_ids` (0 = padding or an empty slot). A query that sees no key returns zeros.

The kernel reads K/V heads-major (`[B, K, S, H]`); the wrapper transposes the `[B, S, K, H]` contract layout,
which costs one extra pass over the cache (a cache stored heads-major would avoid it). Inference only (no
gradient). `interpret=True` runs it in Pallas's interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels.flash_attention_tpu import MASK_VALUE, NN, NT, _precision, _round_up
from phi_jax.kernels.reference import check_positive_ints, check_shapes


def _decode_kernel(off_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, o_ref, m_ref, l_ref, m_scr, l_scr, acc_scr, *,
                   scale, causal, use_q_ids, t, bk, blocks_per_split, precision):
    split, jb = pl.program_id(2), pl.program_id(3)
    off = off_ref[0]
    block = split * blocks_per_split + jb

    @pl.when(jb == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(jnp.logical_or(not causal, block * bk <= off + t - 1))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [M, H], [bk, H], [bk, H]
        rows = q.shape[0]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32, precision=precision) * scale  # [M, bk]
        kv_ids = jnp.broadcast_to(kvid_ref[...], (rows, bk))  # int32 ids broadcast, then compared
        mask = kv_ids != 0
        if causal:
            q_pos = off + lax.rem(lax.broadcasted_iota(jnp.int32, (rows, bk), 0), t)  # row g*T + t -> position
            k_pos = block * bk + lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
            mask = mask & (k_pos <= q_pos)
        if use_q_ids:
            mask = mask & (jnp.broadcast_to(qid_ref[...], (rows, bk)) == kv_ids)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + lax.dot_general(p.astype(v.dtype), v, NN,
                                                              preferred_element_type=jnp.float32,
                                                              precision=precision)
        m_scr[...] = m_new

    @pl.when(jb == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = acc_scr[...]
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None, kv_segment_ids=None,
                     causal: bool = True, q_offset=0, sm_scale: float | None = None, block_k: int | None = None,
                     num_splits: int | None = None, interpret=False) -> jax.Array:
    """The contract of `phi_jax.kernels.reference` for few queries against a long cache (no gradient).

    Args:
      q: `[B, T, N, H]` (T small: the G*T rows of a key head form one tile); k, v: `[B, S, K, H]`.
      q_segment_ids `[B, T]`, kv_segment_ids `[B, S]`, causal, q_offset, sm_scale: see the contract.
      block_k: keys per grid step (a multiple of 128; default 512, or S rounded up to 128 when shorter).
      num_splits: key ranges computed in parallel and combined (default: up to 8, at least 2 blocks each).
      interpret: run in Pallas's interpreter (CPU).
    Returns:
      `[B, T, N, H]` in q's dtype.
    """
    check_shapes(q, k, v, q_segment_ids, kv_segment_ids, "decode_attention", q_offset)
    check_positive_ints("decode_attention", block_k=block_k, num_splits=num_splits)
    if block_k is not None and block_k % 128:
        raise ValueError(f"decode_attention: block_k={block_k} must be a multiple of 128")
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if not (b and t and s):
        return jnp.zeros(q.shape, q.dtype)  # the contract: nothing to see (S = 0) is zeros
    g = n // kh
    scale = h ** -0.5 if sm_scale is None else float(sm_scale)
    bk = block_k or min(512, _round_up(s, 128))
    blocks = -(-s // bk)
    splits = num_splits or max(1, min(8, blocks // 2))
    per_split = -(-blocks // splits)
    sp = splits * per_split * bk
    rows = g * t
    mp = _round_up(rows, 16)
    use_q_ids = q_segment_ids is not None and kv_segment_ids is not None

    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, rows, h)  # [B, K, G*T, H]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, mp - rows), (0, 0)))
    kt = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, K, Sp, H]
    vt = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kv_ids = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)))[:, None, :]  # [B, 1, Sp]
    q_ids = jnp.zeros((b, t), jnp.int32) if not use_q_ids else q_segment_ids.astype(jnp.int32)
    q_ids = jnp.pad(jnp.tile(q_ids, (1, g)), ((0, 0), (0, mp - rows)))[:, :, None]  # [B, Mp, 1], row g*T + t
    off = jnp.asarray(q_offset, jnp.int32).reshape(1)

    def block_index(split, jb, off):
        block = split * per_split + jb
        if causal:  # clamp skipped blocks to the last needed one: no copy is issued for them
            block = jnp.minimum(block, lax.div(off[0] + t - 1, bk))
        return block

    kernel = functools.partial(_decode_kernel, scale=scale, causal=causal, use_q_ids=use_q_ids, t=t, bk=bk,
                               blocks_per_split=per_split, precision=_precision(q.dtype))
    part_spec = lambda width: pl.BlockSpec((None, None, None, mp, width),
                                           lambda bi, hi, sp_, jb, off: (bi, hi, sp_, 0, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kh, splits, per_split),
            in_specs=[
                pl.BlockSpec((None, None, mp, h), lambda bi, hi, sp_, jb, off: (bi, hi, 0, 0)),
                pl.BlockSpec((None, None, bk, h), lambda bi, hi, sp_, jb, off: (bi, hi, block_index(sp_, jb, off), 0)),
                pl.BlockSpec((None, None, bk, h), lambda bi, hi, sp_, jb, off: (bi, hi, block_index(sp_, jb, off), 0)),
                pl.BlockSpec((None, mp, 1), lambda bi, hi, sp_, jb, off: (bi, 0, 0)),
                pl.BlockSpec((None, 1, bk), lambda bi, hi, sp_, jb, off: (bi, 0, block_index(sp_, jb, off))),
            ],
            out_specs=[part_spec(h), part_spec(1), part_spec(1)],
            scratch_shapes=[pltpu.VMEM((mp, 1), jnp.float32), pltpu.VMEM((mp, 1), jnp.float32),
                            pltpu.VMEM((mp, h), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, mp, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, mp, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, mp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="phi_decode_attention",
    )(off, qg, kt, vt, q_ids, kv_ids)

    # Combine the splits: rescale each partial to the common max, divide once; empty rows stay zero.
    m_all = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, Mp, 1]
    w = jnp.exp(m - m_all)
    num = jnp.sum(w * acc, axis=2)  # [B, K, Mp, H]
    den = jnp.sum(w * l, axis=2)  # [B, K, Mp, 1]
    out = num * jnp.where(den == 0, 0.0, 1.0 / jnp.where(den == 0, 1.0, den))
    out = out[:, :, :rows].reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out.astype(q.dtype)
