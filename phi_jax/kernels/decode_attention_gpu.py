"""Flash-decoding on NVIDIA Hopper (Mosaic GPU): a few query tokens against a long KV cache, with the contract of
`phi_jax.kernels.reference` (`attention_reference` is its reference).

    decode_attention_gpu(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, q_offset=0,
                         sm_scale=None, num_splits=None, block_sizes=None, interpret=False)

A decode step has T = 1 (or a few) queries per sequence, so its work is reading the cache, and one CTA per
(sequence, head) leaves most of the GPU idle at small batches (phi-2 at batch 1: 32 CTAs on 132
multiprocessors). The keys are cut into `num_splits` contiguous ranges, each a sequence of its own for the
forward kernel of `flash_attention_gpu` (the splits are folded into the batch axis, so the one kernel runs
B * N * splits CTAs, the splits of a sequence reading its one row of queries, not a copy each); each returns its
output normalised over its own keys and the base-2 log-sum-exp of its scores, and a small XLA combine weighs the
splits by `2 ** (lse_i - max lse)`. A split that sees no key (past
the query's position, or all padding) has weight 0; a query that sees no key at all returns zeros.

Positions: queries sit at `q_offset + [0, T)` (an int or a traced scalar); split i holds keys
`[i * chunk, (i + 1) * chunk)`, so its queries are given positions `q_offset + t - i * chunk` for the kernel's
causal comparison with the chunk-local key index. Valid keys come from `kv_segment_ids` (0 = padding or a cache
slot not written yet), as in the forward kernel. Key blocks past the query inside a split are masked, not
skipped (the forward kernel skips blocks only for a static offset). The splits are a reshape of the cache, free
when its length is a multiple of the key block (128) and `num_splits` divides the number of blocks (the default
does); otherwise the cache is padded, a copy per call.

Inference only (no gradient). `interpret=True` runs it in Pallas's Mosaic GPU interpreter (CPU tests; float32
allowed there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi_jax.kernels.flash_attention_gpu import (BlockSizes, _fwd_call, _interpret_params, _round_up, check_block_sizes,
                                                 segment_ids)
from phi_jax.kernels.reference import attention_reference, check_positive_ints, check_shapes

# About two waves of CTAs on an H100/H200 (132 multiprocessors): the default number of splits aims at this many
# CTAs in all, B * N * splits, at least one key block per split.
TARGET_CTAS = 264


def default_splits(batch: int, n_heads: int, kv_len: int, block_kv: int) -> int:
    """Splits of the keys so that B * N * splits is at most about TARGET_CTAS: the largest divisor of the number of
    key blocks under that, so that the splits tile the (block-rounded) cache exactly and it is never copied."""
    blocks = max(1, -(-kv_len // block_kv))
    want = max(1, min(blocks, TARGET_CTAS // max(1, batch * n_heads)))
    return max(d for d in range(1, want + 1) if blocks % d == 0)


def decode_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None, kv_segment_ids=None,
                         causal: bool = True, q_offset=0, sm_scale: float | None = None,
                         num_splits: int | None = None, block_sizes: BlockSizes | None = None,
                         interpret=False) -> jax.Array:
    """The contract of `phi_jax.kernels.reference` for decode steps, on the Mosaic GPU forward kernel split over
    the keys (see the module docstring). num_splits: key ranges run in parallel (default `default_splits`)."""
    check_shapes(q, k, v, q_segment_ids, kv_segment_ids, "decode_attention_gpu", q_offset)
    check_block_sizes(block_sizes, "decode_attention_gpu")
    batch, t, n_heads, head_dim = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    check_positive_ints("decode_attention_gpu", num_splits=num_splits)
    if not (batch and t and s):
        return jnp.zeros(q.shape, q.dtype)  # the contract: nothing to see (S = 0) is zeros
    ref_kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_offset=q_offset,
                  sm_scale=sm_scale)
    sixteen_bit = q.dtype in (jnp.bfloat16, jnp.float16)
    if head_dim % 16 or not (sixteen_bit or (interpret and q.dtype == jnp.float32)):
        return attention_reference(q, k, v, **ref_kw)  # the kernel takes 16-bit data, head dims in 16s

    bs = block_sizes or BlockSizes.get_default()
    bk = bs.block_kv
    splits = num_splits or default_splits(batch, n_heads, s, bk)
    blocks = max(1, -(-s // bk))
    splits = min(splits, blocks)
    chunk = -(-blocks // splits) * bk
    s_pad = chunk * splits
    t_pad = _round_up(t, bs.warpgroups * bs.block_q)  # a forward CTA holds warpgroups * block_q query rows
    scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)

    qseg, kvseg = segment_ids(q_segment_ids, kv_segment_ids, batch, t, s)
    kvseg = jnp.pad(kvseg, ((0, 0), (0, s_pad - s))).reshape(batch * splits, chunk)

    def split_keys(x):  # [B, S, K, H] -> [B * splits, chunk, K, H], split-minor
        x = jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
        return x.reshape(batch * splits, chunk, kv_heads, head_dim)

    qpos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(t_pad, dtype=jnp.int32)  # [T_pad]
    qpos = qpos[None, :] - (jnp.arange(splits, dtype=jnp.int32) * chunk)[:, None]  # [splits, T_pad]
    qpos = jnp.broadcast_to(qpos[None], (batch, splits, t_pad)).reshape(batch * splits, t_pad)
    qseg = jnp.repeat(jnp.pad(qseg, ((0, 0), (0, t_pad - t))), splits, axis=0)  # [B * splits, T_pad]
    qmeta = jnp.stack([qpos, qseg], axis=1)  # [B * splits, 2, T_pad]
    qs = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))  # each split's CTAs read their sequence's row

    out, lse = _fwd_call(qs, split_keys(k), split_keys(v), qmeta, kvseg, causal=bool(causal), static_offset=None,
                         use_seg=True, scale=scale, bs=bs, interpret=_interpret_params(interpret))
    # combine: out [B*splits, T_pad, N, H] normalised per split; lse [B*splits, N, T_pad] base 2, +inf if empty
    out = out.reshape(batch, splits, t_pad, n_heads, head_dim)[:, :, :t].astype(jnp.float32)
    lse = lse.reshape(batch, splits, n_heads, t_pad)[..., :t].transpose(0, 1, 3, 2)  # [B, splits, T, N]
    lse = jnp.where(jnp.isinf(lse), -jnp.inf, lse)
    top = jnp.max(lse, axis=1, keepdims=True)
    weight = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # 0 for empty splits
    total = jnp.sum(weight, axis=1)  # [B, T, N]
    combined = jnp.einsum("bstn,bstnh->btnh", weight, out)
    return (combined / jnp.where(total == 0, 1.0, total)[..., None]).astype(q.dtype)


def decode_flops_and_bytes(batch: int, t: int, n_heads: int, kv_heads: int, kv_len: int, head_dim: int,
                           itemsize: int) -> tuple[int, int]:
    """FLOPs of one decode attention (every key) and bytes of its K/V cache read: the floor's numerator."""
    return 4 * batch * n_heads * t * kv_len * head_dim, 2 * batch * kv_len * kv_heads * head_dim * itemsize

