"""Flash attention for TPU in Pallas (Mosaic TPU), forward and backward, with the contract of
`phi_jax.kernels.reference` (its `attention_reference` is the pure-JAX reference of this kernel).

    flash_attention_tpu(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, q_offset=0,
                        sm_scale=None, block_sizes=None, interpret=False)

Layout: the wrapper transposes q to `[B, N, T, H]` and k, v to `[B, K, S, H]` so that each grid step sees a
`[block, H]` tile (H = 64 or 80 is the full last dimension, so no padding of the head dimension); T and S are
padded to whole blocks inside the wrapper (padded keys carry segment id 0, so they are never seen; padded
queries are sliced off). Grouped-query attention maps query head n to key/value head n // (N // K) in the
BlockSpec index maps: K/V are never repeated, and the backward accumulates dK/dV of a key head over its group
of query heads inside one kernel.

Kernels (`q_offset` is a scalar-prefetch operand, so a traced cache index works):
  forward  grid (B, N, T/bq, S/bk): online softmax in float32 VMEM scratch (running max m, sum l, acc);
           writes the output and the per-row log-sum-exp.
  dK/dV    grid (B, K, S/bk, G, T/bq): computed transposed (keys along sublanes: s^T = k q^T) so that the
           per-query statistics are rows and no in-kernel transpose is needed.
  dQ       grid (B, N, T/bq, S/bk).
With `causal`, key blocks entirely after a query block are skipped, and the index maps clamp the skipped
steps to a block already resident so that they issue no copy.

Masked scores use a finite floor and probabilities are zeroed by the mask itself, so a query that sees no key
returns zeros (never NaN) and contributes no gradient. `interpret=True` runs the same kernels with Pallas's
interpreter (CPU tests).

Status: checked against the reference in the interpreter and lowered to Mosaic (jax.export for TPU) from a
CPU; not yet compiled or timed on a TPU (Mosaic's layout passes run only there), and the default blocks
(128 x 128) are untuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels.reference import check_shapes

# A finite floor for masked scores: exp(floor - m) underflows to 0 while floor - floor stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block_sizes(t: int, s: int, block_sizes) -> tuple[int, int]:
    """(block_q, block_k): queries in multiples of 16 sublanes (bf16 packs two rows per sublane) up to 128 (a whole
    multiple of 128 past that, since the backward reads query statistics as lane rows), keys in multiples of 128
    lanes."""
    if block_sizes is None:
        bq = min(128, _round_up(t, 16))
        bk = 128
    else:
        if (not isinstance(block_sizes, (tuple, list)) or len(block_sizes) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in block_sizes)):
            raise ValueError(f"flash_attention_tpu: block_sizes={block_sizes!r} must be a pair (block_q, block_k) "
                             f"of positive ints")
        bq, bk = block_sizes
    if bq % 8 or bk % 128:
        raise ValueError(f"flash_attention_tpu: block_sizes={block_sizes!r}: block_q must be a multiple of 8 and "
                         f"block_k of 128")
    if _round_up(t, bq) > bq and bq % 128:
        raise ValueError(f"flash_attention_tpu: block_sizes={block_sizes!r}: block_q must be a multiple of 128 "
                         f"when T={t} spans several blocks")
    return bq, bk


def _visible(off, q_start, k_start, bq, bk, q_ids, kv_ids, *, causal, use_q_ids, transposed=False):
    """The contract's visibility for one tile: `[bq, bk]` bool (`[bk, bq]` when `transposed`).

    q_ids / kv_ids are `[bq, 1]` / `[1, bk]` (`[1, bq]` / `[bk, 1]` when transposed)."""
    shape = (bk, bq) if transposed else (bq, bk)
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    kv_ids = jnp.broadcast_to(kv_ids, shape)  # broadcast int32 ids, compare full tiles (no bool broadcasts)
    mask = kv_ids != 0
    if causal:
        q_pos = off + q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        mask = mask & (k_pos <= q_pos)
    if use_q_ids:
        mask = mask & (jnp.broadcast_to(q_ids, shape) == kv_ids)
    return mask


def _needed(off, q_block, k_block, bq, bk, causal):
    """Whether query block q_block sees any key of key block k_block (causality only)."""
    if not causal:
        return True
    return k_block * bk <= off + q_block * bq + bq - 1


def _last_k_block(off, q_block, bq, bk, nk, causal):
    if not causal:
        return nk - 1
    return jnp.clip(lax.div(off + q_block * bq + bq - 1, bk), 0, nk - 1)  # lax.div: no sign op on the scalar core


def _first_q_block(off, k_block, bq, bk, nq, causal):
    if not causal:
        return 0
    return jnp.clip(lax.div(k_block * bk - off, bq), 0, nq - 1)  # truncation: a negative start clips to 0


# ---- forward -------------------------------------------------------------------------------------------------

def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                scale, causal, use_q_ids, bq, bk, precision):
    i, j = pl.program_id(2), pl.program_id(3)
    off = off_ref[0]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_needed(off, i, j, bq, bk, causal))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [bq, H], [bk, H], [bk, H]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32, precision=precision) * scale
        mask = _visible(off, i * bq, j * bk, bq, bk, qid_ref[...], kvid_ref[...], causal=causal,
                        use_q_ids=use_q_ids)  # [bq, bk]
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]  # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # [bq, bk]
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32, precision=precision)
        acc_scr[...] = alpha * acc_scr[...] + pv
        m_scr[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0  # the row saw no key
        o_ref[...] = (acc_scr[...] * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _forward(q, k, v, q_ids, kv_ids, off, *, causal, use_q_ids, scale, bq, bk, interpret):
    """q: `[B, N, Tp, H]`; k, v: `[B, K, Sp, H]`; q_ids `[B, Tp, 1]`, kv_ids `[B, 1, Sp]` int32; off `[1]` int32.
    Returns (out `[B, N, Tp, H]`, lse `[B, N, Tp, 1]` float32)."""
    b, n, tp, h = q.shape
    kh, sp = k.shape[1], k.shape[2]
    g = n // kh
    nq, nk = tp // bq, sp // bk

    def kv_map(bi, ni, i, j, off):
        return bi, lax.div(ni, g), jnp.minimum(j, _last_k_block(off[0], i, bq, bk, nk, causal)), 0

    def kvid_map(bi, ni, i, j, off):
        return bi, 0, jnp.minimum(j, _last_k_block(off[0], i, bq, bk, nk, causal))

    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, use_q_ids=use_q_ids, bq=bq, bk=bk,
                               precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, n, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j, off: (bi, ni, i, 0)),
                pl.BlockSpec((None, None, bk, h), kv_map),
                pl.BlockSpec((None, None, bk, h), kv_map),
                pl.BlockSpec((None, bq, 1), lambda bi, ni, i, j, off: (bi, i, 0)),
                pl.BlockSpec((None, 1, bk), kvid_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j, off: (bi, ni, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j, off: (bi, ni, i, 0)),
            ],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="phi_flash_attention_fwd",
    )(off, q, k, v, q_ids, kv_ids)


# ---- backward ------------------------------------------------------------------------------------------------

def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qid_ref, kvid_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, scale, causal, use_q_ids, bq, bk, precision):
    """One key block against one query block of one head of the group, transposed: `[bk, bq]` tiles."""
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    off = off_ref[0]

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_needed(off, i, j, bq, bk, causal))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]  # [bq, H], [bk, H], [bk, H], [bq, H]
        st = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32, precision=precision) * scale  # [bk, bq]
        mask = _visible(off, i * bq, j * bk, bq, bk, qid_ref[...], kvid_ref[...], causal=causal,
                        use_q_ids=use_q_ids, transposed=True)
        pt = jnp.where(mask, jnp.exp(st - lse_ref[...]), 0.0)  # [bk, bq]; lse_ref is a [1, bq] row
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, NN, preferred_element_type=jnp.float32,
                                       precision=precision)
        dpt = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32, precision=precision)  # [bk, bq]
        dst = pt * (dpt - di_ref[...])
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, NN, preferred_element_type=jnp.float32,
                                       precision=precision)

    @pl.when((gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qid_ref, kvid_ref, dq_ref, dq_scr, *,
               scale, causal, use_q_ids, bq, bk, precision):
    i, j = pl.program_id(2), pl.program_id(3)
    off = off_ref[0]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_needed(off, i, j, bq, bk, causal))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32, precision=precision) * scale  # [bq, bk]
        mask = _visible(off, i * bq, j * bk, bq, bk, qid_ref[...], kvid_ref[...], causal=causal,
                        use_q_ids=use_q_ids)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)  # lse_ref is a [bq, 1] column
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32, precision=precision)  # [bq, bk]
        ds = p * (dp - di_ref[...])
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32,
                                       precision=precision)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _backward(q, k, v, q_ids, kv_ids, off, o, lse, do, *, causal, use_q_ids, scale, bq, bk, interpret):
    b, n, tp, h = q.shape
    kh, sp = k.shape[1], k.shape[2]
    g = n // kh
    nq, nk = tp // bq, sp // bk
    precision = _precision(q.dtype)
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, N, Tp, 1]
    # Row forms for the transposed dK/dV kernel (a free reshape: same element order).
    lse_row, di_row = lse.reshape(b, n, 1, tp), di.reshape(b, n, 1, tp)
    q_ids_row, kv_ids_col = q_ids.reshape(b, 1, tp), kv_ids.reshape(b, sp, 1)
    common = dict(scale=scale, causal=causal, use_q_ids=use_q_ids, bq=bq, bk=bk, precision=precision)

    # dK, dV: grid (B, K, S/bk, G, T/bq); query blocks before the key block are skipped and clamped.
    def q_map(bi, hi, j, gi, i, off):
        return bi, hi * g + gi, jnp.maximum(i, _first_q_block(off[0], j, bq, bk, nq, causal)), 0

    def row_map(bi, hi, j, gi, i, off):
        return bi, hi * g + gi, 0, jnp.maximum(i, _first_q_block(off[0], j, bq, bk, nq, causal))

    def qid_map(bi, hi, j, gi, i, off):
        return bi, 0, jnp.maximum(i, _first_q_block(off[0], j, bq, bk, nq, causal))

    kv_spec = pl.BlockSpec((None, None, bk, h), lambda bi, hi, j, gi, i, off: (bi, hi, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kh, nk, g, nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), q_map),
                kv_spec, kv_spec,
                pl.BlockSpec((None, None, bq, h), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, 1, bq), qid_map),
                pl.BlockSpec((None, bk, 1), lambda bi, hi, j, gi, i, off: (bi, j, 0)),
            ],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="phi_flash_attention_dkv",
    )(off, q, k, v, do, lse_row, di_row, q_ids_row, kv_ids_col)

    # dQ: grid (B, N, T/bq, S/bk), as the forward.
    def kv_map(bi, ni, i, j, off):
        return bi, lax.div(ni, g), jnp.minimum(j, _last_k_block(off[0], i, bq, bk, nk, causal)), 0

    def kvid_map(bi, ni, i, j, off):
        return bi, 0, jnp.minimum(j, _last_k_block(off[0], i, bq, bk, nk, causal))

    q_spec = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j, off: (bi, ni, i, 0))
    col_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j, off: (bi, ni, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, n, nq, nk),
            in_specs=[
                q_spec,
                pl.BlockSpec((None, None, bk, h), kv_map),
                pl.BlockSpec((None, None, bk, h), kv_map),
                q_spec, col_spec, col_spec,
                pl.BlockSpec((None, bq, 1), lambda bi, ni, i, j, off: (bi, i, 0)),
                pl.BlockSpec((None, 1, bk), kvid_map),
            ],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="phi_flash_attention_dq",
    )(off, q, k, v, do, lse, di, q_ids, kv_ids)
    return dq, dk, dv


def _precision(dtype):
    """float32 inputs get full-precision MXU passes (the default would round them to bf16)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _flash(q, k, v, q_ids, kv_ids, off, causal, use_q_ids, scale, bq, bk, interpret):
    out, _ = _forward(q, k, v, q_ids, kv_ids, off, causal=causal, use_q_ids=use_q_ids, scale=scale, bq=bq, bk=bk,
                      interpret=interpret)
    return out


def _flash_fwd(q, k, v, q_ids, kv_ids, off, causal, use_q_ids, scale, bq, bk, interpret):
    out, lse = _forward(q, k, v, q_ids, kv_ids, off, causal=causal, use_q_ids=use_q_ids, scale=scale, bq=bq,
                        bk=bk, interpret=interpret)
    return out, (q, k, v, q_ids, kv_ids, off, out, lse)


def _flash_bwd(causal, use_q_ids, scale, bq, bk, interpret, res, do):
    q, k, v, q_ids, kv_ids, off, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_ids, kv_ids, off, out, lse, do, causal=causal, use_q_ids=use_q_ids,
                           scale=scale, bq=bq, bk=bk, interpret=interpret)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None, kv_segment_ids=None,
                        causal: bool = True, q_offset=0, sm_scale: float | None = None, block_sizes=None,
                        interpret=False) -> jax.Array:
    """The contract of `phi_jax.kernels.reference` with Pallas Mosaic TPU kernels (differentiable in q, k, v).

    Args:
      q: `[B, T, N, H]`; k, v: `[B, S, K, H]` (N a multiple of K).
      q_segment_ids: `[B, T]`, kv_segment_ids: `[B, S]` int (0 = padding key), see the contract.
      causal, q_offset: query t sits at position q_offset + t (int or traced int32 scalar).
      sm_scale: default 1/sqrt(H).
      block_sizes: optional `(block_q, block_k)`; default (min(128, T rounded up to 16), 128).
      interpret: run the kernels in Pallas's interpreter (CPU) instead of compiling them for a TPU.
    Returns:
      `[B, T, N, H]` in q's dtype.
    """
    check_shapes(q, k, v, q_segment_ids, kv_segment_ids, "flash_attention_tpu", q_offset)
    b, t, n, h = q.shape
    s = k.shape[1]
    bq, bk = _block_sizes(max(t, 1), s, block_sizes)
    if not (b and t and s):
        return jnp.zeros(q.shape, q.dtype)  # the contract: nothing to see (S = 0) is zeros
    scale = h ** -0.5 if sm_scale is None else float(sm_scale)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    use_q_ids = q_segment_ids is not None and kv_segment_ids is not None
    kv_ids = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)))[:, None, :]  # [B, 1, Sp]; padded keys are never seen
    q_ids = jnp.zeros((b, t), jnp.int32) if not use_q_ids else q_segment_ids.astype(jnp.int32)
    q_ids = jnp.pad(q_ids, ((0, 0), (0, tp - t)))[:, :, None]  # [B, Tp, 1]
    off = jnp.asarray(q_offset, jnp.int32).reshape(1)
    qt = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
    kt = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, K, Sp, H]
    vt = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = _flash(qt, kt, vt, q_ids, kv_ids, off, bool(causal), use_q_ids, scale, bq, bk, interpret)
    return out.transpose(0, 2, 1, 3)[:, :t]  # [B, T, N, H]
