"""Flash attention for Hopper GPUs in Pallas's Mosaic GPU backend, forward and backward.

`flash_attention_gpu` follows the contract of `phi_jax.kernels.reference` (q `[B, T, N, H]`, k/v `[B, S, K, H]`,
grouped-query attention without repeating K/V, segment ids for padding and packing, causal with a query offset,
zeros for rows that see nothing) and is differentiable through `jax.custom_vjp`.

Kernels (all `plgpu.kernel`, one warpgroup per CTA by default, K/V or Q/dO streamed through shared memory by TMA copies
`slots` deep, so the copy of block j+slots runs while block j is in the tensor cores):
  - forward: one CTA per (query block, head, batch); S = Q K^T and O += P V on `plgpu.wgmma` (P from registers),
    online softmax in float32 (base-2, the scale folded into one multiplier); writes O and the base-2
    log-sum-exp per row (+inf for a row that sees nothing, so the backward gives it zero gradients).
    `BlockSizes(warpgroups=2)` (opt-in) makes it warp-specialised: two consumer warpgroups of `block_q` rows each
    share every K/V tile (half the K/V copies per query row) and a third, producer warpgroup issues all K/V copies;
    each consumer arrives on a per-slot "free" barrier (two arrivals) when done with K or V of a slot, and the
    producer waits on it before refilling the slot. A consumer whose causal rows need fewer key blocks than its
    neighbour's still waits on and releases the remaining blocks after writing its output.
  - dq: one CTA per (query block, head, batch), loops over key blocks; dS = P (dP - delta), dQ += dS K.
  - dk/dv: one CTA per (key block, KV head, batch), loops over the G query heads of its group and their query
    blocks, so GQA gradients are summed in the kernel (K/V never repeated, no reduction afterwards).
  `BlockSizes.bwd_paired` (default on) issues the backward's independent products together and waits once per
  pair: dq's S = Q K^T and dP = dO V^T; dk/dv's S^T and dP^T, then dV += P^T dO and dK += dS^T Q (`False`: each
  product is waited on before the next is issued).
  `BlockSizes.head_split` (default on, the forward and so the decode kernel) tiles a head dim that is not a
  multiple of 64 as its multiple of 64 (128-byte swizzle) plus a 16..48-wide rest (32-byte swizzle), one TMA copy
  per part: products over the head dim are one wgmma per part into one accumulator, products into it one
  accumulator per part. At head_dim 80 it ran the forward 1.6x faster on an H200 (benchmarks/RESULTS.md).
  `BlockSizes.bwd_head_split` (default on) does the same in the dq and dk/dv kernels. With the pairing, the
  head_dim-80 forward + backward ran 1.06x faster on an H200 (275.5 against 261.0 TFLOP/s, the fifth run).
  Causal work is skipped block-wise (with a Python-int `q_offset`); blocks wholly below the diagonal run without
  masks. Head dims are tiled natively: a multiple of 64 uses (8, 64) tiles and a 128-byte swizzle, other
  multiples of 16 (phi-2's 80) use (8, 16) tiles and a 32-byte swizzle, never padded to 128.

Interpret mode (`interpret=True`, for CPU tests) runs the same kernels in Pallas's Mosaic GPU interpreter (TMA
copies, barriers, warpgroup threads, the pipelining and all the masking and softmax code are shared; it checks that
every waiter sees every phase of a barrier) with one difference: the interpreter has no transposed wgmma operands
and no register operands, so the matrix products are plain `lax.dot_general`s on the same shared-memory tiles.
Where the kernel cannot run (float32 inputs outside interpret mode, head_dim not a multiple of 16), the wrapper
falls back to `attention_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from phi_jax.kernels.reference import attention_reference, check_shapes

_LOG2E = math.log2(math.e)
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: rows of Q and K per block in the forward, dq and dk/dv kernels; `slots` is the depth of the
    TMA pipeline (>= 2); `overlap` software-pipelines the forward's two matmuls; `warpgroups` (1 or 2) is the
    number of consumer warpgroups per forward CTA, each owning `block_q` query rows and all sharing every K/V
    tile in shared memory (2: a third, producer warpgroup issues the K/V copies, as in FlashAttention-3)."""
    block_q: int = 64
    block_kv: int = 128
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    slots: int = 2
    overlap: bool = True  # forward: the QK^T of block j+1 runs on the tensor cores during the softmax of block j
    warpgroups: int = 1  # forward: consumer warpgroups per CTA (2 halves the K/V copies per query row)
    # Forward: a head dim that is not a multiple of 64 (phi-2's 80) in two column parts, its multiple of 64 with
    # the 128-byte swizzle and the 16..48-wide rest with the 32-byte one, each its own TMA copy (instead of 16-wide
    # tiles for all of it, whose narrow copies bound the head_dim-80 forward on an H200: 1.775 -> 1.107 ms at batch
    # 4 x 32 heads x 4096, benchmarks/RESULTS.md, 2026-11-27). `bwd_head_split`: the same in the dq and dk/dv
    # kernels (numerics PASS on an H200 in the fourth run).
    head_split: bool = True
    bwd_head_split: bool = True
    # Backward (dq and dk/dv kernels): issue the products that do not depend on each other together and wait once
    # per pair (dq: S and dP; dk/dv: S^T and dP^T, then dV and dK), instead of waiting on each product in turn.
    # Split and paired, the head_dim-80 fwd+bwd ran at 275.5 TFLOP/s against 261.0 with neither (H200, fifth run).
    bwd_paired: bool = True
    # Profiling only (benchmarks/gpu_attention.py --ablate): forward stages left out, so that the time each one
    # costs is the difference to the whole kernel. Any of "qk" (no QK^T matmul), "exp" (no online softmax: P is
    # S cast to 16 bits), "pv" (no PV matmul), "mask" (no masks); and in the backward kernels, "bwd_mm" (no
    # matmuls: every product is zeros) and "bwd_exp" (P is S, no exponential). The output is then WRONG.
    ablate: frozenset = frozenset()

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"):
            val = getattr(self, name)
            if val % 64 or val > 256:
                raise ValueError(f"BlockSizes.{name}={val} must be a multiple of 64 and at most 256")
        if self.slots < 2:
            raise ValueError(f"BlockSizes.slots={self.slots} must be at least 2")
        if self.warpgroups not in (1, 2):
            raise ValueError(f"BlockSizes.warpgroups={self.warpgroups} must be 1 or 2")
        if self.warpgroups == 2 and self.head_split and self.slots > 2:  # hangs in Pallas's interpreter (2026-11-26)
            raise ValueError(f"BlockSizes: warpgroups=2 with head_split=True (the default) takes slots=2 only (got "
                             f"slots={self.slots}; pass head_split=False for a deeper pipeline)")
        unknown = set(self.ablate) - {"qk", "exp", "pv", "mask", "bwd_mm", "bwd_exp"}
        if unknown:
            raise ValueError(f"BlockSizes.ablate={sorted(self.ablate)}: unknown stages {sorted(unknown)}")

    @classmethod
    def get_default(cls) -> "BlockSizes":
        """The sizes measured in benchmarks/RESULTS.md (an H200 sweep at head_dim 80 found no better block sizes;
        the forward's head split ran 1.6x faster there)."""
        return cls()


def check_block_sizes(block_sizes, name: str) -> None:
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{name}: block_sizes must be a flash_attention_gpu.BlockSizes or None, got {block_sizes!r}")


def _interpret_params(interpret):
    """`interpret=True` means Pallas's Mosaic GPU interpreter (the generic HLO interpreter has no TMA)."""
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # not public in jax 0.10/0.11
        return InterpretGPUParams()
    return interpret or None


def _tile_transforms(head_dim: int, dtype) -> tuple:
    """(8, 64) tiles with a 128-byte swizzle where the head dim allows, else 16-wide tiles, 32-byte swizzle."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = 128 if head_dim % (128 * 8 // bits) == 0 else 32
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _head_parts(head_dim: int, split: bool) -> tuple[tuple[int, int], ...]:
    """(first column, width) of each head-dim part: one part, or the multiple of 64 and the rest (`head_split`)."""
    main = head_dim // 64 * 64
    if not split or main in (0, head_dim):
        return ((0, head_dim),)
    return ((0, main), (main, head_dim - main))


def _part_smem(parts, lead: tuple, dtype, interpret) -> tuple:
    """Shared-memory tiles `[*lead, width]` for each head-dim part, each with its own tiling and swizzle.

    A split's multiple-of-64 part is a union of two views of the same bytes: tiled for the wgmmas, untiled (same
    128-byte swizzle, same bytes, as its tiles are whole rows) for the TMA copies, whose tiling would otherwise
    have to divide the global array's full head dim. `_views` takes them apart in the kernel. (The interpreter
    ignores tilings and swizzles: one view there.)"""
    types = []
    for _, w in parts:
        tr = _tile_transforms(w, dtype)
        tiled = plgpu.SMEM((*lead, w), dtype, transforms=tr)
        if _aliased(parts, w, interpret):
            types.append(plgpu.RefUnion(tiled, plgpu.SMEM((*lead, w), dtype, transforms=(tr[1],))))
        else:
            types.append(tiled)
    return tuple(types)


def _aliased(parts, width: int, interpret) -> bool:
    return len(parts) > 1 and width % 64 == 0 and interpret is None


def _views(refs, parts, interpret) -> tuple[tuple, tuple]:
    """(refs for the wgmmas and registers, refs for the TMA copies) of `_part_smem`'s tiles."""
    pairs = [tuple(r) if _aliased(parts, w, interpret) else (r, r) for r, (_, w) in zip(refs, parts)]
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def _part_barriers(parts, n: int) -> tuple:
    return tuple(plgpu.Barrier(num_barriers=n) for _ in parts)


def _copy_in(ref, idx: tuple, dsts, bars, parts) -> None:
    """TMA copies of `ref[idx]` (the head dim last) into the part tiles `dsts`, part p arriving on `bars[p]`."""
    if len(parts) == 1:
        plgpu.copy_gmem_to_smem(ref.at[idx], dsts[0], bars[0])
        return
    for (c0, w), dst, bar in zip(parts, dsts, bars):
        plgpu.copy_gmem_to_smem(ref.at[(*idx, pl.ds(c0, w))], dst, bar)


def _copy_out(srcs, ref, idx: tuple, parts) -> None:
    if len(parts) == 1:
        plgpu.copy_smem_to_gmem(srcs[0], ref.at[idx])
        return
    for (c0, w), src in zip(parts, srcs):
        plgpu.copy_smem_to_gmem(src, ref.at[(*idx, pl.ds(c0, w))])


def _wait_all(bars) -> None:
    for bar in bars:
        plgpu.barrier_wait(bar)


def _at(refs, *idx) -> tuple:
    return tuple(r.at[idx] for r in refs)


# ---------------------------------------------------------------------------------------------------------------
# In-kernel helpers: the only places where the compiled and the interpreted kernels differ.

class _Ops:
    def __init__(self, interpret: bool, skip_mm: bool = False):
        self.interpret = interpret
        self.skip_mm = skip_mm  # profiling (BlockSizes.ablate "bwd_mm"): every product is zeros

    def matmul(self, a, b, *, a_is_ref: bool, transpose_b: bool, shape):
        """a @ b (or a @ b^T) with float32 accumulation; a: smem ref or 16-bit registers, b: smem ref."""
        return self.matmul_sum([(a, b)], a_is_ref=a_is_ref, transpose_b=transpose_b, shape=shape)

    def matmul_sum(self, pairs, *, a_is_ref: bool, transpose_b: bool, shape):
        """The sum over (a, b) pairs of a @ b (or a @ b^T): one accumulator, one wgmma per pair (head-dim parts)."""
        return self.matmuls([(pairs, shape)], a_is_ref=a_is_ref, transpose_b=transpose_b)[0]

    def matmul_each(self, a, bs, *, a_is_ref: bool, shapes) -> tuple:
        """(a @ b for b in bs), every wgmma issued before the first result is read (b: the head-dim parts)."""
        return self.matmuls([([(a, b)], shape) for b, shape in zip(bs, shapes)], a_is_ref=a_is_ref,
                            transpose_b=False)

    def matmuls(self, accs, *, a_is_ref: bool, transpose_b: bool) -> tuple:
        """One result per (pairs, shape) of `accs`, each the sum over its (a, b) pairs of a @ b (or a @ b^T) in its
        own float32 accumulator; every wgmma is issued before the first result is read."""
        if self.skip_mm:
            return tuple(self.full(shape, 0.0) for _, shape in accs)
        if self.interpret:
            dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
            return tuple(functools.reduce(jnp.add, [lax.dot_general(a[...] if a_is_ref else a, b[...], dims,
                                                                    preferred_element_type=_F32) for a, b in pairs])
                         for pairs, _ in accs)

        def body(*acc_refs):
            for acc_ref, (pairs, _) in zip(acc_refs, accs):
                for a, b in pairs:
                    plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
            return tuple(acc_ref[...] for acc_ref in acc_refs)
        return pl.run_scoped(body, *(plgpu.ACC(shape, _F32) for _, shape in accs))

    def vec(self, ref, along: int):
        """A 1-D smem vector as registers laid out along dim `along` (0 rows, 1 columns) of a wgmma tile."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - along))

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def full(self, shape, value):
        x = jnp.full(shape, value, _F32)
        if self.interpret:
            return x
        return plgpu.layout_cast(x, plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1))


def _bcast(x, shape, dim):
    """Broadcast a vector laid along `dim` of a 2-D tile to the tile."""
    return lax.broadcast_in_dim(x, shape, (dim,))


def _refill_when_read(fetch, step, slot, n_steps, slots: int, what) -> None:
    """Every thread of the warpgroup is done reading `slot`; then the TMA refills it with block `step + slots`,
    if there is one (the refill of a multi-stage TMA pipeline, shared by the forward, dq and dk/dv kernels)."""
    plgpu.commit_smem()

    @pl.when(step + slots < n_steps)
    def _():
        fetch(step + slots, slot, what)


def _where(mask, x, fill):
    """x where `mask` (from `_mask`) holds, else fill; no mask (nothing hidden): x."""
    return x if mask is None else jnp.where(mask, x, fill)


def _mask(ops, shape, *, causal, use_seg, q_along, qpos, qseg, kv0, kvseg):
    """The contract's visibility for one tile (None when neither causal nor segments hide anything: a loop of
    masked steps is traced even where it runs no step). q_along is the tile dim that indexes queries (0 or 1)."""
    kv_along = 1 - q_along
    mask = None
    if causal:
        kv_idx = ops.iota(shape, kv_along) + kv0
        mask = kv_idx <= _bcast(qpos, shape, q_along)
    if use_seg:
        kvs = _bcast(kvseg, shape, kv_along)
        seg = (kvs != 0) & (_bcast(qseg, shape, q_along) == kvs)
        mask = seg if mask is None else (mask & seg)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Forward.

def _fwd_call(q, k, v, qmeta, kvseg, *, causal, static_offset, use_seg, scale, bs: BlockSizes, interpret):
    """The forward kernel over `batch = k.shape[0]` sequences. `q` may hold fewer rows than `k` (the decode
    kernel's key splits): sequence b then reads query row b // (batch // q.shape[0]), unrepeated in memory."""
    t_pad, n_heads, head_dim = q.shape[1:]
    batch, s_pad, kv_heads = k.shape[:3]
    q_groups = batch // q.shape[0]  # sequences sharing one row of q
    group = n_heads // kv_heads
    bq, bk, slots, wgs = bs.block_q, bs.block_kv, bs.slots, bs.warpgroups
    nq, nkv = t_pad // (wgs * bq), s_pad // bk  # a CTA holds wgs * bq query rows
    dtype = q.dtype
    ops = _Ops(interpret is not None)
    c = scale * _LOG2E  # scores -> base-2 logits
    ablate = bs.ablate
    parts = _head_parts(head_dim, bs.head_split)
    nparts = len(parts)

    def kv_steps(q0):
        """(steps, unmasked steps) of key blocks for the query rows [q0, q0 + bq)."""
        if causal and static_offset is not None:  # skip blocks above the diagonal, no masks below it
            n_steps = jnp.minimum(jnp.int32(nkv), lax.div(q0 + (static_offset + bq + bk - 1), jnp.int32(bk)))
            n_free = 0 if use_seg else jnp.minimum(n_steps, lax.div(q0 + (static_offset + 1), jnp.int32(bk)))
        else:
            n_steps = jnp.int32(nkv)
            n_free = 0 if (causal or use_seg) else n_steps
        return n_steps, n_free

    def body(q_ref, k_ref, v_ref, qmeta_ref, kvseg_ref, o_ref, lse_ref, *,
             q_smem, k_smem, v_smem, qmeta_smem, kvseg_smem, lse_smem, q_bar, k_bar, v_bar, s_bar,
             k_free=None, v_free=None):
        qi, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        kvh = lax.div(h, jnp.int32(group))
        wg = lax.axis_index("wg") if wgs > 1 else 0
        n_cta, _ = kv_steps(qi * (wgs * bq) + (wgs - 1) * bq)  # the last warpgroup's rows need the most keys
        (q_smem, q_copy), (k_smem, k_copy), (v_smem, v_copy) = (_views(r, parts, interpret)
                                                                for r in (q_smem, k_smem, v_smem))

        def fetch(step, slot, what):
            rows = (b, pl.ds(step * bk, bk), kvh)
            if what == "k":
                _copy_in(k_ref, rows, _at(k_copy, slot), _at(k_bar, slot), parts)
                plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(step * bk, bk)], kvseg_smem.at[slot], s_bar.at[slot])
            else:
                _copy_in(v_ref, rows, _at(v_copy, slot), _at(v_bar, slot), parts)

        def prologue():  # the first `slots` key blocks
            for i in range(min(slots, nkv)):
                @pl.when(i < n_cta)
                def _():
                    fetch(i, i, "k")
                    fetch(i, i, "v")

        def release(step, slot, what):
            """This warpgroup is done with K (and the key segments) or V of `slot`."""
            if wgs > 1:  # the producer refills it once every consumer warpgroup has arrived
                plgpu.barrier_arrive((k_free if what == "k" else v_free).at[slot])
                return
            _refill_when_read(fetch, step, slot, n_cta, slots, what)

        def consumer(wg):
            """One warpgroup: attention of the query rows [q0, q0 + bq) over the key blocks of this CTA."""
            mine = (lambda ref: ref.at[wg]) if wgs > 1 else (lambda ref: ref)
            q_s, qmeta_s, lse_s = tuple(mine(r) for r in q_smem), mine(qmeta_smem), mine(lse_smem)
            q_c = tuple(mine(r) for r in q_copy)
            q0 = qi * (wgs * bq) + wg * bq
            n_steps, n_free = kv_steps(q0)
            q_bars = tuple(q_bar.at[(nparts + 1) * wg + p] for p in range(nparts))
            meta_bar = q_bar.at[(nparts + 1) * wg + nparts]

            _copy_in(q_ref, (b if q_groups == 1 else lax.div(b, jnp.int32(q_groups)), pl.ds(q0, bq), h), q_c,
                     q_bars, parts)
            plgpu.copy_gmem_to_smem(qmeta_ref.at[b, :, pl.ds(q0, bq)], qmeta_s, meta_bar)
            if wgs == 1:
                prologue()
            _wait_all(q_bars)
            plgpu.barrier_wait(meta_bar)
            qpos = ops.vec(qmeta_s.at[0], 0)
            qseg = ops.vec(qmeta_s.at[1], 0)

            def softmax(step, s, carry, masked):
                """Online-softmax update with the scores of `step`: (rescaled acc, m, l, 16-bit P)."""
                acc, m_i, l_i = carry
                if "exp" in ablate:
                    return acc, m_i, l_i, s.astype(dtype)
                if masked and "mask" not in ablate:
                    slot = lax.rem(step, jnp.int32(slots))
                    mask = _mask(ops, (bq, bk), causal=causal, use_seg=use_seg, q_along=0, qpos=qpos, qseg=qseg,
                                 kv0=step * bk, kvseg=ops.vec(kvseg_smem.at[slot], 1))
                    s = _where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                p = jnp.exp2(s * c - _bcast(m_use, (bq, bk), 0))
                alpha = jnp.exp2(m_i - m_use)
                l_i = l_i * alpha + p.sum(axis=1)
                acc = tuple(a * _bcast(alpha, (bq, w), 0) for a, (_, w) in zip(acc, parts))
                return acc, m_new, l_i, p.astype(dtype)

            def wait_k(slot):
                _wait_all(_at(k_bar, slot))
                plgpu.barrier_wait(s_bar.at[slot])

            def qk(slot):
                wait_k(slot)
                if "qk" in ablate:
                    return ops.full((bq, bk), 0.0)
                return ops.matmul_sum(list(zip(q_s, _at(k_smem, slot))), a_is_ref=True, transpose_b=True,
                                      shape=(bq, bk))

            def pv(step, slot, p16, acc):
                _wait_all(_at(v_bar, slot))
                if "pv" in ablate:
                    return acc
                out = ops.matmul_each(p16, _at(v_smem, slot), a_is_ref=False, shapes=[(bq, w) for _, w in parts])
                return tuple(a + o for a, o in zip(acc, out))

            def step_fn(step, carry, masked):  # S = QK^T, softmax, O += PV, one after the other
                slot = lax.rem(step, jnp.int32(slots))
                acc, m_i, l_i, p16 = softmax(step, qk(slot), carry, masked)
                release(step, slot, "k")
                acc = pv(step, slot, p16, acc)
                release(step, slot, "v")
                return acc, m_i, l_i

            def step_overlap(step, carry, masked):
                """The tensor cores compute S for step+1 while this warpgroup does the softmax of step (carried)."""
                *carry, s_cur = carry
                slot = lax.rem(step, jnp.int32(slots))
                nslot = lax.rem(step + 1, jnp.int32(slots))
                wait_k(nslot)

                def with_next_scores(s_next_ref):
                    if not ops.interpret and s_next_ref is not None:
                        for q_p, k_p in zip(q_s, _at(k_smem, nslot)):
                            plgpu.wgmma(s_next_ref, q_p, plgpu.transpose_ref(k_p, (1, 0)))
                    acc, m_i, l_i, p16 = softmax(step, s_cur, carry, masked)
                    release(step, slot, "k")
                    acc = pv(step, slot, p16, acc)  # waits for both matmuls
                    release(step, slot, "v")
                    if "qk" in ablate:
                        return acc, m_i, l_i, ops.full((bq, bk), 0.0)
                    if ops.interpret:  # the barriers for nslot were waited on above
                        return acc, m_i, l_i, ops.matmul_sum(list(zip(q_s, _at(k_smem, nslot))), a_is_ref=True,
                                                             transpose_b=True, shape=(bq, bk))
                    return acc, m_i, l_i, s_next_ref[...]
                if ops.interpret or "qk" in ablate:
                    return with_next_scores(None)
                return pl.run_scoped(with_next_scores, plgpu.ACC((bq, bk), _F32))

            acc0 = tuple(ops.full((bq, w), 0.0) for _, w in parts)
            carry = (acc0, ops.full((bq,), -jnp.inf), ops.full((bq,), 0.0))
            if bs.overlap:
                last = n_steps - 1
                carry = (*carry, qk(0))
                carry = lax.fori_loop(0, jnp.minimum(n_free, last), functools.partial(step_overlap, masked=False),
                                      carry)
                carry = lax.fori_loop(jnp.minimum(n_free, last), last,
                                      functools.partial(step_overlap, masked=True), carry)
                *carry, s_last = carry
                last_slot = lax.rem(last, jnp.int32(slots))
                acc, m_i, l_i, p16 = softmax(last, s_last, carry, bool(causal or use_seg))
                if wgs > 1:  # (one warpgroup: nothing left to refill)
                    release(last, last_slot, "k")
                acc = pv(last, last_slot, p16, acc)
                if wgs > 1:
                    release(last, last_slot, "v")
            else:
                carry = lax.fori_loop(0, n_free, functools.partial(step_fn, masked=False), carry)
                acc, m_i, l_i = lax.fori_loop(n_free, n_steps, functools.partial(step_fn, masked=True), carry)

            empty = l_i == 0.0
            inv_l = 1.0 / jnp.where(empty, 1.0, l_i)
            for q_p, a, (_, w) in zip(q_s, acc, parts):
                q_p[...] = (a * _bcast(inv_l, (bq, w), 0)).astype(dtype)
            lse_s[...] = jnp.where(empty, jnp.inf, m_i + jnp.log2(jnp.where(empty, 1.0, l_i)))
            plgpu.commit_smem()
            _copy_out(q_c, o_ref, (b, pl.ds(q0, bq), h), parts)
            plgpu.copy_smem_to_gmem(lse_s, lse_ref.at[b, h, pl.ds(q0, bq)])

            if wgs > 1:
                def drain(step, _):
                    """Key blocks that only a later warpgroup needs: take part in their barriers so the
                    producer can refill the slots (and every waiter sees every phase)."""
                    slot = lax.rem(step, jnp.int32(slots))
                    _wait_all(_at(k_bar, slot) + (s_bar.at[slot],) + _at(v_bar, slot))
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                lax.fori_loop(n_steps, n_cta, drain, None)
            plgpu.wait_smem_to_gmem(0)

        if wgs == 1:
            consumer(0)
            return

        @pl.when(wg < wgs)
        def _consumers():
            plgpu.set_max_registers(232, action="increase")
            consumer(wg)

        @pl.when(wg == wgs)
        def _producer():
            """Issues every K/V copy: block step + slots into a slot once all consumers released it."""
            plgpu.set_max_registers(40, action="decrease")
            prologue()

            def refill(step, _):
                slot = lax.rem(step, jnp.int32(slots))
                plgpu.barrier_wait(k_free.at[slot])
                fetch(step + slots, slot, "k")
                plgpu.barrier_wait(v_free.at[slot])
                fetch(step + slots, slot, "v")
            lax.fori_loop(0, jnp.maximum(n_cta - slots, 0), refill, None)
            for i in range(slots):  # the last releases, so that this thread sees every phase of the barriers
                step = n_cta - slots + i

                @pl.when(step >= 0)
                def _():
                    slot = lax.rem(step, jnp.int32(slots))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

    lead = (wgs,) if wgs > 1 else ()  # per consumer warpgroup
    scratch = dict(
        q_smem=_part_smem(parts, (*lead, bq), dtype, interpret),
        k_smem=_part_smem(parts, (slots, bk), dtype, interpret),
        v_smem=_part_smem(parts, (slots, bk), dtype, interpret),
        qmeta_smem=plgpu.SMEM((*lead, 2, bq), jnp.int32),
        kvseg_smem=plgpu.SMEM((slots, bk), jnp.int32),
        lse_smem=plgpu.SMEM((*lead, bq), _F32),
        q_bar=plgpu.Barrier(num_barriers=(nparts + 1) * wgs),  # per warpgroup: Q's parts, then its metadata
        k_bar=_part_barriers(parts, slots),
        v_bar=_part_barriers(parts, slots),
        s_bar=plgpu.Barrier(num_barriers=slots),
    )
    threads = {}
    if wgs > 1:  # consumer warpgroups 0..wgs-1 and one producer warpgroup
        scratch.update(k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
                       v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots))
        threads = dict(num_threads=wgs + 1, thread_name="wg")
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((batch, *q.shape[1:]), dtype),
                  jax.ShapeDtypeStruct((batch, n_heads, t_pad), _F32)),
        scratch_types=scratch,
        grid=(nq, n_heads, batch),
        grid_names=("q", "h", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        **threads,
    )(q, k, v, qmeta, kvseg)


# ---------------------------------------------------------------------------------------------------------------
# Backward: dq.

def _dq_call(q, k, v, do, qmeta, kvseg, stats, *, causal, static_offset, use_seg, scale, bs: BlockSizes,
             interpret):
    batch, t_pad, n_heads, head_dim = q.shape
    s_pad, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    bq, bk, slots = bs.block_q_dq, bs.block_kv_dq, bs.slots
    nq, nkv = t_pad // bq, s_pad // bk
    dtype = q.dtype
    ops = _Ops(interpret is not None, skip_mm="bwd_mm" in bs.ablate)
    c = scale * _LOG2E
    parts = _head_parts(head_dim, bs.bwd_head_split)
    exp2 = (lambda x: x) if "bwd_exp" in bs.ablate else jnp.exp2

    def body(q_ref, k_ref, v_ref, do_ref, qmeta_ref, kvseg_ref, stats_ref, dq_ref, *,
             q_smem, do_smem, k_smem, v_smem, qmeta_smem, stats_smem, kvseg_smem, q_bar, do_bar, k_bar, v_bar,
             s_bar):
        qi, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        kvh = lax.div(h, jnp.int32(group))
        q0 = qi * bq
        (q_smem, q_copy), (do_smem, do_copy), (k_smem, k_copy), (v_smem, v_copy) = (
            _views(r, parts, interpret) for r in (q_smem, do_smem, k_smem, v_smem))
        if causal and static_offset is not None:
            n_steps = jnp.minimum(jnp.int32(nkv), lax.div(q0 + (static_offset + bq + bk - 1), jnp.int32(bk)))
            n_free = 0 if use_seg else jnp.minimum(n_steps, lax.div(q0 + (static_offset + 1), jnp.int32(bk)))
        else:
            n_steps = jnp.int32(nkv)
            n_free = 0 if (causal or use_seg) else n_steps

        _copy_in(q_ref, (b, pl.ds(q0, bq), h), q_copy, _at(q_bar, 0), parts)
        _copy_in(do_ref, (b, pl.ds(q0, bq), h), do_copy, _at(do_bar, 0), parts)
        plgpu.copy_gmem_to_smem(qmeta_ref.at[b, :, pl.ds(q0, bq)], qmeta_smem, s_bar.at[slots])
        plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, pl.ds(q0, bq)], stats_smem, s_bar.at[slots + 1])

        def fetch(step, slot, what):
            rows = (b, pl.ds(step * bk, bk), kvh)
            if what == "k":
                _copy_in(k_ref, rows, _at(k_copy, slot), _at(k_bar, slot), parts)
                plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(step * bk, bk)], kvseg_smem.at[slot], s_bar.at[slot])
            else:
                _copy_in(v_ref, rows, _at(v_copy, slot), _at(v_bar, slot), parts)

        for i in range(min(slots, nkv)):
            @pl.when(i < n_steps)
            def _():
                fetch(i, i, "k")
                fetch(i, i, "v")

        _wait_all(_at(q_bar, 0) + _at(do_bar, 0) + (s_bar.at[slots], s_bar.at[slots + 1]))
        qpos = ops.vec(qmeta_smem.at[0], 0)
        qseg = ops.vec(qmeta_smem.at[1], 0)
        lse = ops.vec(stats_smem.at[0], 0)
        delta = ops.vec(stats_smem.at[1], 0)

        def step_fn(step, dq, masked):
            slot = lax.rem(step, jnp.int32(slots))
            _wait_all(_at(k_bar, slot) + (s_bar.at[slot],))
            s_pairs = list(zip(q_smem, _at(k_smem, slot)))
            dp_pairs = list(zip(do_smem, _at(v_smem, slot)))
            if bs.bwd_paired:  # S and dP in flight together
                _wait_all(_at(v_bar, slot))
                s, dp = ops.matmuls([(s_pairs, (bq, bk)), (dp_pairs, (bq, bk))], a_is_ref=True, transpose_b=True)
                _refill_when_read(fetch, step, slot, n_steps, slots, "v")
            else:
                s = ops.matmul_sum(s_pairs, a_is_ref=True, transpose_b=True, shape=(bq, bk))
            p = exp2(s * c - _bcast(lse, (bq, bk), 0))
            if masked:
                mask = _mask(ops, (bq, bk), causal=causal, use_seg=use_seg, q_along=0, qpos=qpos, qseg=qseg,
                             kv0=step * bk, kvseg=ops.vec(kvseg_smem.at[slot], 1))
                p = _where(mask, p, 0.0)
            if not bs.bwd_paired:
                _wait_all(_at(v_bar, slot))
                dp = ops.matmul_sum(dp_pairs, a_is_ref=True, transpose_b=True, shape=(bq, bk))
                _refill_when_read(fetch, step, slot, n_steps, slots, "v")
            ds = p * (dp - _bcast(delta, (bq, bk), 0))
            prods = ops.matmul_each(ds.astype(dtype), _at(k_smem, slot), a_is_ref=False,
                                    shapes=[(bq, w) for _, w in parts])
            dq = tuple(a + d for a, d in zip(dq, prods))

            _refill_when_read(fetch, step, slot, n_steps, slots, "k")
            return dq

        dq = tuple(ops.full((bq, w), 0.0) for _, w in parts)
        dq = lax.fori_loop(0, n_free, functools.partial(step_fn, masked=False), dq)
        dq = lax.fori_loop(n_free, n_steps, functools.partial(step_fn, masked=True), dq)
        for q_p, d in zip(q_smem, dq):
            q_p[...] = (d * scale).astype(dtype)
        plgpu.commit_smem()
        _copy_out(q_copy, dq_ref, (b, pl.ds(q0, bq), h), parts)
        plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        q_smem=_part_smem(parts, (bq,), dtype, interpret),
        do_smem=_part_smem(parts, (bq,), dtype, interpret),
        k_smem=_part_smem(parts, (slots, bk), dtype, interpret),
        v_smem=_part_smem(parts, (slots, bk), dtype, interpret),
        qmeta_smem=plgpu.SMEM((2, bq), jnp.int32),
        stats_smem=plgpu.SMEM((2, bq), _F32),
        kvseg_smem=plgpu.SMEM((slots, bk), jnp.int32),
        q_bar=_part_barriers(parts, 1),
        do_bar=_part_barriers(parts, 1),
        k_bar=_part_barriers(parts, slots),
        v_bar=_part_barriers(parts, slots),
        s_bar=plgpu.Barrier(num_barriers=slots + 2),  # key segments per slot, then query metadata and stats
    )
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=scratch,
        grid=(nq, n_heads, batch),
        grid_names=("q", "h", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, do, qmeta, kvseg, stats)


# ---------------------------------------------------------------------------------------------------------------
# Backward: dk, dv (summed over the query heads of each KV head in the kernel).

def _dkv_call(q, k, v, do, qmeta, kvseg, stats, *, causal, static_offset, use_seg, scale, bs: BlockSizes,
              interpret):
    batch, t_pad, n_heads, head_dim = q.shape
    s_pad, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    bq, bk, slots = bs.block_q_dkv, bs.block_kv_dkv, bs.slots
    nq, nkv = t_pad // bq, s_pad // bk
    dtype = q.dtype
    ops = _Ops(interpret is not None, skip_mm="bwd_mm" in bs.ablate)
    c = scale * _LOG2E
    parts = _head_parts(head_dim, bs.bwd_head_split)
    exp2 = (lambda x: x) if "bwd_exp" in bs.ablate else jnp.exp2

    def body(q_ref, k_ref, v_ref, do_ref, qmeta_ref, kvseg_ref, stats_ref, dk_ref, dv_ref, *,
             k_smem, v_smem, kvseg_smem, q_smem, do_smem, qmeta_smem, stats_smem, k_bar, v_bar, kv_bar, q_bar,
             do_bar, m_bar):
        ki, kvh, b = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
        kv0 = ki * bk
        (k_smem, k_copy), (v_smem, v_copy), (q_smem, q_copy), (do_smem, do_copy) = (
            _views(r, parts, interpret) for r in (k_smem, v_smem, q_smem, do_smem))
        if causal and static_offset is not None:
            # query blocks that see some key of this block, and from which on they see all of it
            q_start = lax.div(jnp.maximum(kv0 - static_offset, 0), jnp.int32(bq))
            q_start = jnp.minimum(q_start, jnp.int32(nq))
            q_full = lax.div(jnp.maximum(kv0 + (bk - 1 - static_offset), 0) + (bq - 1), jnp.int32(bq))
        else:
            q_start = jnp.int32(0)
        per_head = nq - q_start
        n_steps = per_head * group

        _copy_in(k_ref, (b, pl.ds(kv0, bk), kvh), k_copy, _at(k_bar, 0), parts)
        _copy_in(v_ref, (b, pl.ds(kv0, bk), kvh), v_copy, _at(v_bar, 0), parts)
        plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(kv0, bk)], kvseg_smem, kv_bar.at[0])

        def fetch(step, slot, what):
            g = lax.div(step, per_head)
            qb = q_start + lax.rem(step, per_head)
            h = kvh * group + g
            rows = (b, pl.ds(qb * bq, bq), h)
            if what == "q":
                _copy_in(q_ref, rows, _at(q_copy, slot), _at(q_bar, slot), parts)
                plgpu.copy_gmem_to_smem(qmeta_ref.at[b, :, pl.ds(qb * bq, bq)], qmeta_smem.at[slot], m_bar.at[slot])
            else:
                _copy_in(do_ref, rows, _at(do_copy, slot), _at(do_bar, slot), parts)
                plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, pl.ds(qb * bq, bq)], stats_smem.at[slot],
                                        m_bar.at[slots + slot])

        for i in range(slots):
            @pl.when(i < n_steps)
            def _():
                fetch(i, i, "q")
                fetch(i, i, "do")

        _wait_all(_at(k_bar, 0) + _at(v_bar, 0) + (kv_bar.at[0],))
        kvseg = ops.vec(kvseg_smem, 0)

        def step_fn(qb, carry, g, masked):
            """One query block: S^T, P^T, dV += P^T dO, dP^T, dS^T, dK += dS^T Q (`bwd_paired`: S^T and dP^T in
            flight together, then dV and dK)."""
            dk, dv = carry
            step = g * per_head + (qb - q_start)
            slot = lax.rem(step, jnp.int32(slots))
            _wait_all(_at(q_bar, slot) + (m_bar.at[slot], m_bar.at[slots + slot]))
            st_pairs = list(zip(k_smem, _at(q_smem, slot)))
            dpt_pairs = list(zip(v_smem, _at(do_smem, slot)))
            if bs.bwd_paired:
                _wait_all(_at(do_bar, slot))
                st, dpt = ops.matmuls([(st_pairs, (bk, bq)), (dpt_pairs, (bk, bq))], a_is_ref=True, transpose_b=True)
            else:
                st = ops.matmul_sum(st_pairs, a_is_ref=True, transpose_b=True, shape=(bk, bq))
            pt = exp2(st * c - _bcast(ops.vec(stats_smem.at[slot, 0], 1), (bk, bq), 1))
            if masked:
                mask = _mask(ops, (bk, bq), causal=causal, use_seg=use_seg, q_along=1,
                             qpos=ops.vec(qmeta_smem.at[slot, 0], 1), qseg=ops.vec(qmeta_smem.at[slot, 1], 1),
                             kv0=kv0, kvseg=kvseg)
                pt = _where(mask, pt, 0.0)
            delta = _bcast(ops.vec(stats_smem.at[slot, 1], 1), (bk, bq), 1)
            shapes = [(bk, w) for _, w in parts]
            if bs.bwd_paired:
                pt16, dst16 = pt.astype(dtype), (pt * (dpt - delta)).astype(dtype)
                prods = ops.matmuls([([(pt16, d)], shape) for d, shape in zip(_at(do_smem, slot), shapes)]
                                    + [([(dst16, q_p)], shape) for q_p, shape in zip(_at(q_smem, slot), shapes)],
                                    a_is_ref=False, transpose_b=False)
                dv_new, dk_new = prods[:len(parts)], prods[len(parts):]
                _refill_when_read(fetch, step, slot, n_steps, slots, "do")
            else:
                _wait_all(_at(do_bar, slot))
                dv_new = ops.matmul_each(pt.astype(dtype), _at(do_smem, slot), a_is_ref=False, shapes=shapes)
                dpt = ops.matmul_sum(dpt_pairs, a_is_ref=True, transpose_b=True, shape=(bk, bq))
                _refill_when_read(fetch, step, slot, n_steps, slots, "do")
                dk_new = ops.matmul_each((pt * (dpt - delta)).astype(dtype), _at(q_smem, slot), a_is_ref=False,
                                         shapes=shapes)
            _refill_when_read(fetch, step, slot, n_steps, slots, "q")
            return tuple(a + d for a, d in zip(dk, dk_new)), tuple(a + d for a, d in zip(dv, dv_new))

        if causal and static_offset is not None:
            q_mid = jnp.clip(q_full, q_start, nq)

            def head_fn(g, carry):  # blocks cut by the diagonal, then those wholly below it
                carry = lax.fori_loop(q_start, q_mid, functools.partial(step_fn, g=g, masked=True), carry)
                return lax.fori_loop(q_mid, nq, functools.partial(step_fn, g=g, masked=use_seg), carry)
        else:
            def head_fn(g, carry):
                return lax.fori_loop(q_start, nq, functools.partial(step_fn, g=g, masked=causal or use_seg), carry)
        zeros = tuple(ops.full((bk, w), 0.0) for _, w in parts)
        dk, dv = lax.fori_loop(0, group, head_fn, (zeros, zeros))
        for k_p, v_p, dk_p, dv_p in zip(k_smem, v_smem, dk, dv):
            k_p[...] = (dk_p * scale).astype(dtype)
            v_p[...] = dv_p.astype(dtype)
        plgpu.commit_smem()
        _copy_out(k_copy, dk_ref, (b, pl.ds(kv0, bk), kvh), parts)
        _copy_out(v_copy, dv_ref, (b, pl.ds(kv0, bk), kvh), parts)
        plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        k_smem=_part_smem(parts, (bk,), dtype, interpret),
        v_smem=_part_smem(parts, (bk,), dtype, interpret),
        kvseg_smem=plgpu.SMEM((bk,), jnp.int32),
        q_smem=_part_smem(parts, (slots, bq), dtype, interpret),
        do_smem=_part_smem(parts, (slots, bq), dtype, interpret),
        qmeta_smem=plgpu.SMEM((slots, 2, bq), jnp.int32),
        stats_smem=plgpu.SMEM((slots, 2, bq), _F32),
        k_bar=_part_barriers(parts, 1),
        v_bar=_part_barriers(parts, 1),
        kv_bar=plgpu.Barrier(num_barriers=1),  # the key segments
        q_bar=_part_barriers(parts, slots),
        do_bar=_part_barriers(parts, slots),
        m_bar=plgpu.Barrier(num_barriers=2 * slots),
    )
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=scratch,
        grid=(nkv, kv_heads, batch),
        grid_names=("kv", "h", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, do, qmeta, kvseg, stats)


# ---------------------------------------------------------------------------------------------------------------
# custom_vjp over padded inputs.

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _flash(q, k, v, qmeta, kvseg, causal, static_offset, use_seg, scale, bs, interpret):
    out, _ = _fwd_call(q, k, v, qmeta, kvseg, causal=causal, static_offset=static_offset, use_seg=use_seg,
                       scale=scale, bs=bs, interpret=interpret)
    return out


def _flash_fwd(q, k, v, qmeta, kvseg, causal, static_offset, use_seg, scale, bs, interpret):
    out, lse = _fwd_call(q, k, v, qmeta, kvseg, causal=causal, static_offset=static_offset, use_seg=use_seg,
                         scale=scale, bs=bs, interpret=interpret)
    return out, (q, k, v, qmeta, kvseg, out, lse)


def _flash_bwd(causal, static_offset, use_seg, scale, bs, interpret, res, do):
    q, k, v, qmeta, kvseg, out, lse = res
    delta = jnp.einsum("bthd,bthd->bht", out.astype(_F32), do.astype(_F32))
    stats = jnp.stack([lse, delta], axis=2)  # [B, N, 2, T]
    kw = dict(causal=causal, static_offset=static_offset, use_seg=use_seg, scale=scale, bs=bs, interpret=interpret)
    dq = _dq_call(q, k, v, do, qmeta, kvseg, stats, **kw)
    dk, dv = _dkv_call(q, k, v, do, qmeta, kvseg, stats, **kw)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def segment_ids(q_segment_ids, kv_segment_ids, batch: int, t: int, s: int) -> tuple[jax.Array, jax.Array]:
    """The kernels' int32 query `[B, T]` and key `[B, S]` ids for the contract's segment ids (either may be None):
    a query sees a key when the ids are equal and the key's is not 0."""
    if kv_segment_ids is None:
        q_segment_ids = None  # the contract ignores query segments without key segments
    kvseg = jnp.ones((batch, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    if q_segment_ids is None:
        # a key only has to be valid: every query and every valid key share the id 1
        return jnp.ones((batch, t), jnp.int32), jnp.where(kvseg != 0, 1, 0)
    return q_segment_ids.astype(jnp.int32), kvseg


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None, kv_segment_ids=None,
                        causal: bool = True, q_offset=0, sm_scale: float | None = None,
                        block_sizes: BlockSizes | None = None, interpret=False) -> jax.Array:
    """The contract of `phi_jax.kernels.reference` on the Mosaic GPU kernels (see the module docstring).

    block_sizes: a `BlockSizes` (defaults fit head_dim 64..128 on an H100/H200). interpret: True runs the
    kernels in Pallas's Mosaic GPU interpreter (CPU tests; float32 allowed there).
    """
    check_shapes(q, k, v, q_segment_ids, kv_segment_ids, "flash_attention_gpu", q_offset)
    check_block_sizes(block_sizes, "flash_attention_gpu")
    batch, t, n_heads, head_dim = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if not (batch and t and s):
        return jnp.zeros(q.shape, q.dtype)  # the contract: nothing to see (S = 0) is zeros
    ref_kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_offset=q_offset,
                  sm_scale=sm_scale)
    sixteen_bit = q.dtype in (jnp.bfloat16, jnp.float16)
    if head_dim % 16 or not (sixteen_bit or (interpret and q.dtype == _F32)):
        return attention_reference(q, k, v, **ref_kw)  # the kernels take 16-bit data, head dims in 16s

    bs = block_sizes or BlockSizes.get_default()
    scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
    interp = _interpret_params(interpret)
    static_offset = int(q_offset) if isinstance(q_offset, int) else None

    t_mult = math.lcm(bs.warpgroups * bs.block_q, bs.block_q_dq, bs.block_q_dkv)
    s_mult = math.lcm(bs.block_kv, bs.block_kv_dq, bs.block_kv_dkv)
    t_pad, s_pad = _round_up(t, t_mult), _round_up(s, s_mult)
    use_seg = kv_segment_ids is not None or s_pad != s
    qseg, kvseg = segment_ids(q_segment_ids, kv_segment_ids, batch, t, s)
    qpos = jnp.broadcast_to((jnp.asarray(q_offset, jnp.int32) + jnp.arange(t_pad, dtype=jnp.int32))[None],
                            (batch, t_pad))
    qmeta = jnp.stack([qpos, jnp.pad(qseg, ((0, 0), (0, t_pad - t)))], axis=1)  # [B, 2, T]
    kvseg = jnp.pad(kvseg, ((0, 0), (0, s_pad - s)))
    pad4 = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    out = _flash(pad4(q, t_pad), pad4(k, s_pad), pad4(v, s_pad), qmeta, kvseg, bool(causal), static_offset,
                 use_seg, scale, bs, interp)
    return out[:, :t]
