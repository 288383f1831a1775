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
    # Profiling only (benchmarks/gpu_attention.py --ablate): forward stages left out, so that the time each one
    # costs is the difference to the whole kernel. Any of "qk" (no QK^T matmul), "exp" (no online softmax: P is
    # S cast to 16 bits), "pv" (no PV matmul), "mask" (no masks). The output is then WRONG.
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
        unknown = set(self.ablate) - {"qk", "exp", "pv", "mask"}
        if unknown:
            raise ValueError(f"BlockSizes.ablate={sorted(self.ablate)}: unknown stages {sorted(unknown)}")

    @classmethod
    def get_default(cls) -> "BlockSizes":
        """The sizes measured in benchmarks/RESULTS.md (an H200 sweep at head_dim 80 found no better one)."""
        return cls()


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


# ---------------------------------------------------------------------------------------------------------------
# In-kernel helpers: the only places where the compiled and the interpreted kernels differ.

class _Ops:
    def __init__(self, interpret: bool):
        self.interpret = interpret

    def matmul(self, a, b, *, a_is_ref: bool, transpose_b: bool, shape):
        """a @ b (or a @ b^T) with float32 accumulation; a: smem ref or 16-bit registers, b: smem ref."""
        if self.interpret:
            av = a[...] if a_is_ref else a
            dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
            return lax.dot_general(av, b[...], dims, preferred_element_type=_F32)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
            return acc_ref[...]
        return pl.run_scoped(body, plgpu.ACC(shape, _F32))

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


def _mask(ops, shape, *, causal, use_seg, q_along, qpos, qseg, kv0, kvseg):
    """The contract's visibility for one tile. q_along is the tile dim that indexes queries (0 or 1)."""
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
    batch, t_pad, n_heads, head_dim = q.shape
    s_pad, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    bq, bk, slots, wgs = bs.block_q, bs.block_kv, bs.slots, bs.warpgroups
    nq, nkv = t_pad // (wgs * bq), s_pad // bk  # a CTA holds wgs * bq query rows
    dtype = q.dtype
    ops = _Ops(interpret is not None)
    c = scale * _LOG2E  # scores -> base-2 logits
    ablate = bs.ablate

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

        def fetch(step, slot, what):
            rows = (b, pl.ds(step * bk, bk), kvh)
            if what == "k":
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(step * bk, bk)], kvseg_smem.at[slot], s_bar.at[slot])
            else:
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

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
            q_s, qmeta_s, lse_s = mine(q_smem), mine(qmeta_smem), mine(lse_smem)
            q0 = qi * (wgs * bq) + wg * bq
            n_steps, n_free = kv_steps(q0)

            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_s, q_bar.at[2 * wg])
            plgpu.copy_gmem_to_smem(qmeta_ref.at[b, :, pl.ds(q0, bq)], qmeta_s, q_bar.at[2 * wg + 1])
            if wgs == 1:
                prologue()
            plgpu.barrier_wait(q_bar.at[2 * wg])
            plgpu.barrier_wait(q_bar.at[2 * wg + 1])
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
                    s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                p = jnp.exp2(s * c - _bcast(m_use, (bq, bk), 0))
                alpha = jnp.exp2(m_i - m_use)
                l_i = l_i * alpha + p.sum(axis=1)
                return acc * _bcast(alpha, (bq, head_dim), 0), m_new, l_i, p.astype(dtype)

            def qk(slot):
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(s_bar.at[slot])
                if "qk" in ablate:
                    return ops.full((bq, bk), 0.0)
                return ops.matmul(q_s, k_smem.at[slot], a_is_ref=True, transpose_b=True, shape=(bq, bk))

            def pv(step, slot, p16):
                plgpu.barrier_wait(v_bar.at[slot])
                if "pv" in ablate:
                    return ops.full((bq, head_dim), 0.0)
                return ops.matmul(p16, v_smem.at[slot], a_is_ref=False, transpose_b=False, shape=(bq, head_dim))

            def step_fn(step, carry, masked):  # S = QK^T, softmax, O += PV, one after the other
                slot = lax.rem(step, jnp.int32(slots))
                acc, m_i, l_i, p16 = softmax(step, qk(slot), carry, masked)
                release(step, slot, "k")
                acc = acc + pv(step, slot, p16)
                release(step, slot, "v")
                return acc, m_i, l_i

            def step_overlap(step, carry, masked):
                """The tensor cores compute S for step+1 while this warpgroup does the softmax of step (carried)."""
                *carry, s_cur = carry
                slot = lax.rem(step, jnp.int32(slots))
                nslot = lax.rem(step + 1, jnp.int32(slots))
                plgpu.barrier_wait(k_bar.at[nslot])
                plgpu.barrier_wait(s_bar.at[nslot])

                def with_next_scores(s_next_ref):
                    if not ops.interpret and s_next_ref is not None:
                        plgpu.wgmma(s_next_ref, q_s, plgpu.transpose_ref(k_smem.at[nslot], (1, 0)))
                    acc, m_i, l_i, p16 = softmax(step, s_cur, carry, masked)
                    release(step, slot, "k")
                    acc = acc + pv(step, slot, p16)  # waits for both matmuls
                    release(step, slot, "v")
                    if "qk" in ablate:
                        return acc, m_i, l_i, ops.full((bq, bk), 0.0)
                    if ops.interpret:  # the barriers for nslot were waited on above
                        return acc, m_i, l_i, ops.matmul(q_s, k_smem.at[nslot], a_is_ref=True, transpose_b=True,
                                                         shape=(bq, bk))
                    return acc, m_i, l_i, s_next_ref[...]
                if ops.interpret or "qk" in ablate:
                    return with_next_scores(None)
                return pl.run_scoped(with_next_scores, plgpu.ACC((bq, bk), _F32))

            carry = (ops.full((bq, head_dim), 0.0), ops.full((bq,), -jnp.inf), ops.full((bq,), 0.0))
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
                acc = acc + pv(last, last_slot, p16)
                if wgs > 1:
                    release(last, last_slot, "v")
            else:
                carry = lax.fori_loop(0, n_free, functools.partial(step_fn, masked=False), carry)
                acc, m_i, l_i = lax.fori_loop(n_free, n_steps, functools.partial(step_fn, masked=True), carry)

            empty = l_i == 0.0
            inv_l = 1.0 / jnp.where(empty, 1.0, l_i)
            q_s[...] = (acc * _bcast(inv_l, (bq, head_dim), 0)).astype(dtype)
            lse_s[...] = jnp.where(empty, jnp.inf, m_i + jnp.log2(jnp.where(empty, 1.0, l_i)))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, o_ref.at[b, pl.ds(q0, bq), h])
            plgpu.copy_smem_to_gmem(lse_s, lse_ref.at[b, h, pl.ds(q0, bq)])

            if wgs > 1:
                def drain(step, _):
                    """Key blocks that only a later warpgroup needs: take part in their barriers so the
                    producer can refill the slots (and every waiter sees every phase)."""
                    slot = lax.rem(step, jnp.int32(slots))
                    for bar in (k_bar, s_bar, v_bar):
                        plgpu.barrier_wait(bar.at[slot])
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

    tr = _tile_transforms(head_dim, dtype)
    lead = (wgs,) if wgs > 1 else ()  # per consumer warpgroup
    scratch = dict(
        q_smem=plgpu.SMEM((*lead, bq, head_dim), dtype, transforms=tr),
        k_smem=plgpu.SMEM((slots, bk, head_dim), dtype, transforms=tr),
        v_smem=plgpu.SMEM((slots, bk, head_dim), dtype, transforms=tr),
        qmeta_smem=plgpu.SMEM((*lead, 2, bq), jnp.int32),
        kvseg_smem=plgpu.SMEM((slots, bk), jnp.int32),
        lse_smem=plgpu.SMEM((*lead, bq), _F32),
        q_bar=plgpu.Barrier(num_barriers=2 * wgs),
        k_bar=plgpu.Barrier(num_barriers=slots),
        v_bar=plgpu.Barrier(num_barriers=slots),
        s_bar=plgpu.Barrier(num_barriers=slots),
    )
    threads = {}
    if wgs > 1:  # consumer warpgroups 0..wgs-1 and one producer warpgroup
        scratch.update(k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
                       v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots))
        threads = dict(num_threads=wgs + 1, thread_name="wg")
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, n_heads, t_pad), _F32)),
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
    ops = _Ops(interpret is not None)
    c = scale * _LOG2E

    def body(q_ref, k_ref, v_ref, do_ref, qmeta_ref, kvseg_ref, stats_ref, dq_ref, *,
             q_smem, do_smem, k_smem, v_smem, qmeta_smem, stats_smem, kvseg_smem, q_bar, k_bar, v_bar, s_bar):
        qi, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        kvh = lax.div(h, jnp.int32(group))
        q0 = qi * bq
        if causal and static_offset is not None:
            n_steps = jnp.minimum(jnp.int32(nkv), lax.div(q0 + (static_offset + bq + bk - 1), jnp.int32(bk)))
            n_free = 0 if use_seg else jnp.minimum(n_steps, lax.div(q0 + (static_offset + 1), jnp.int32(bk)))
        else:
            n_steps = jnp.int32(nkv)
            n_free = 0 if (causal or use_seg) else n_steps

        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, q_bar.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(q0, bq), h], do_smem, q_bar.at[1])
        plgpu.copy_gmem_to_smem(qmeta_ref.at[b, :, pl.ds(q0, bq)], qmeta_smem, q_bar.at[2])
        plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, pl.ds(q0, bq)], stats_smem, q_bar.at[3])

        def fetch(step, slot, what):
            rows = (b, pl.ds(step * bk, bk), kvh)
            if what == "k":
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(step * bk, bk)], kvseg_smem.at[slot], s_bar.at[slot])
            else:
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

        for i in range(min(slots, nkv)):
            @pl.when(i < n_steps)
            def _():
                fetch(i, i, "k")
                fetch(i, i, "v")

        for i in range(4):
            plgpu.barrier_wait(q_bar.at[i])
        qpos = ops.vec(qmeta_smem.at[0], 0)
        qseg = ops.vec(qmeta_smem.at[1], 0)
        lse = ops.vec(stats_smem.at[0], 0)
        delta = ops.vec(stats_smem.at[1], 0)

        def step_fn(step, dq, masked):
            slot = lax.rem(step, jnp.int32(slots))
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(s_bar.at[slot])
            s = ops.matmul(q_smem, k_smem.at[slot], a_is_ref=True, transpose_b=True, shape=(bq, bk))
            p = jnp.exp2(s * c - _bcast(lse, (bq, bk), 0))
            if masked:
                mask = _mask(ops, (bq, bk), causal=causal, use_seg=use_seg, q_along=0, qpos=qpos, qseg=qseg,
                             kv0=step * bk, kvseg=ops.vec(kvseg_smem.at[slot], 1))
                p = jnp.where(mask, p, 0.0)
            plgpu.barrier_wait(v_bar.at[slot])
            dp = ops.matmul(do_smem, v_smem.at[slot], a_is_ref=True, transpose_b=True, shape=(bq, bk))

            _refill_when_read(fetch, step, slot, n_steps, slots, "v")
            ds = p * (dp - _bcast(delta, (bq, bk), 0))
            dq = dq + ops.matmul(ds.astype(dtype), k_smem.at[slot], a_is_ref=False, transpose_b=False,
                                 shape=(bq, head_dim))

            _refill_when_read(fetch, step, slot, n_steps, slots, "k")
            return dq

        dq = ops.full((bq, head_dim), 0.0)
        dq = lax.fori_loop(0, n_free, functools.partial(step_fn, masked=False), dq)
        dq = lax.fori_loop(n_free, n_steps, functools.partial(step_fn, masked=True), dq)
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, pl.ds(q0, bq), h])
        plgpu.wait_smem_to_gmem(0)

    tr = _tile_transforms(head_dim, dtype)
    scratch = dict(
        q_smem=plgpu.SMEM((bq, head_dim), dtype, transforms=tr),
        do_smem=plgpu.SMEM((bq, head_dim), dtype, transforms=tr),
        k_smem=plgpu.SMEM((slots, bk, head_dim), dtype, transforms=tr),
        v_smem=plgpu.SMEM((slots, bk, head_dim), dtype, transforms=tr),
        qmeta_smem=plgpu.SMEM((2, bq), jnp.int32),
        stats_smem=plgpu.SMEM((2, bq), _F32),
        kvseg_smem=plgpu.SMEM((slots, bk), jnp.int32),
        q_bar=plgpu.Barrier(num_barriers=4),
        k_bar=plgpu.Barrier(num_barriers=slots),
        v_bar=plgpu.Barrier(num_barriers=slots),
        s_bar=plgpu.Barrier(num_barriers=slots),
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
    ops = _Ops(interpret is not None)
    c = scale * _LOG2E

    def body(q_ref, k_ref, v_ref, do_ref, qmeta_ref, kvseg_ref, stats_ref, dk_ref, dv_ref, *,
             k_smem, v_smem, kvseg_smem, q_smem, do_smem, qmeta_smem, stats_smem, kv_bar, q_bar, do_bar, m_bar):
        ki, kvh, b = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
        kv0 = ki * bk
        if causal and static_offset is not None:
            # query blocks that see some key of this block, and from which on they see all of it
            q_start = lax.div(jnp.maximum(kv0 - static_offset, 0), jnp.int32(bq))
            q_start = jnp.minimum(q_start, jnp.int32(nq))
            q_full = lax.div(jnp.maximum(kv0 + (bk - 1 - static_offset), 0) + (bq - 1), jnp.int32(bq))
        else:
            q_start = jnp.int32(0)
        per_head = nq - q_start
        n_steps = per_head * group

        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kv0, bk), kvh], k_smem, kv_bar.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kv0, bk), kvh], v_smem, kv_bar.at[1])
        plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(kv0, bk)], kvseg_smem, kv_bar.at[2])

        def fetch(step, slot, what):
            g = lax.div(step, per_head)
            qb = q_start + lax.rem(step, per_head)
            h = kvh * group + g
            rows = (b, pl.ds(qb * bq, bq), h)
            if what == "q":
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(qmeta_ref.at[b, :, pl.ds(qb * bq, bq)], qmeta_smem.at[slot], m_bar.at[slot])
            else:
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, pl.ds(qb * bq, bq)], stats_smem.at[slot],
                                        m_bar.at[slots + slot])

        for i in range(slots):
            @pl.when(i < n_steps)
            def _():
                fetch(i, i, "q")
                fetch(i, i, "do")

        for i in range(3):
            plgpu.barrier_wait(kv_bar.at[i])
        kvseg = ops.vec(kvseg_smem, 0)

        def step_fn(qb, carry, g, masked):
            dk, dv = carry
            step = g * per_head + (qb - q_start)
            slot = lax.rem(step, jnp.int32(slots))
            plgpu.barrier_wait(q_bar.at[slot])
            plgpu.barrier_wait(m_bar.at[slot])
            plgpu.barrier_wait(m_bar.at[slots + slot])
            st = ops.matmul(k_smem, q_smem.at[slot], a_is_ref=True, transpose_b=True, shape=(bk, bq))
            lse = ops.vec(stats_smem.at[slot, 0], 1)
            delta = ops.vec(stats_smem.at[slot, 1], 1)
            pt = jnp.exp2(st * c - _bcast(lse, (bk, bq), 1))
            if masked:
                mask = _mask(ops, (bk, bq), causal=causal, use_seg=use_seg, q_along=1,
                             qpos=ops.vec(qmeta_smem.at[slot, 0], 1), qseg=ops.vec(qmeta_smem.at[slot, 1], 1),
                             kv0=kv0, kvseg=kvseg)
                pt = jnp.where(mask, pt, 0.0)
            plgpu.barrier_wait(do_bar.at[slot])
            dv = dv + ops.matmul(pt.astype(dtype), do_smem.at[slot], a_is_ref=False, transpose_b=False,
                                 shape=(bk, head_dim))
            dpt = ops.matmul(v_smem, do_smem.at[slot], a_is_ref=True, transpose_b=True, shape=(bk, bq))

            _refill_when_read(fetch, step, slot, n_steps, slots, "do")
            dst = pt * (dpt - _bcast(delta, (bk, bq), 1))
            dk = dk + ops.matmul(dst.astype(dtype), q_smem.at[slot], a_is_ref=False, transpose_b=False,
                                 shape=(bk, head_dim))

            _refill_when_read(fetch, step, slot, n_steps, slots, "q")
            return dk, dv

        if causal and static_offset is not None:
            q_mid = jnp.clip(q_full, q_start, nq)

            def head_fn(g, carry):  # blocks cut by the diagonal, then those wholly below it
                carry = lax.fori_loop(q_start, q_mid, functools.partial(step_fn, g=g, masked=True), carry)
                return lax.fori_loop(q_mid, nq, functools.partial(step_fn, g=g, masked=use_seg), carry)
        else:
            def head_fn(g, carry):
                return lax.fori_loop(q_start, nq, functools.partial(step_fn, g=g, masked=causal or use_seg), carry)
        zeros = ops.full((bk, head_dim), 0.0)
        dk, dv = lax.fori_loop(0, group, head_fn, (zeros, zeros))
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(kv0, bk), kvh])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(kv0, bk), kvh])
        plgpu.wait_smem_to_gmem(0)

    tr = _tile_transforms(head_dim, dtype)
    scratch = dict(
        k_smem=plgpu.SMEM((bk, head_dim), dtype, transforms=tr),
        v_smem=plgpu.SMEM((bk, head_dim), dtype, transforms=tr),
        kvseg_smem=plgpu.SMEM((bk,), jnp.int32),
        q_smem=plgpu.SMEM((slots, bq, head_dim), dtype, transforms=tr),
        do_smem=plgpu.SMEM((slots, bq, head_dim), dtype, transforms=tr),
        qmeta_smem=plgpu.SMEM((slots, 2, bq), jnp.int32),
        stats_smem=plgpu.SMEM((slots, 2, bq), _F32),
        kv_bar=plgpu.Barrier(num_barriers=3),
        q_bar=plgpu.Barrier(num_barriers=slots),
        do_bar=plgpu.Barrier(num_barriers=slots),
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
    check_shapes(q, k, v, q_segment_ids, kv_segment_ids, "flash_attention_gpu")
    batch, t, n_heads, head_dim = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    ref_kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, q_offset=q_offset,
                  sm_scale=sm_scale)
    sixteen_bit = q.dtype in (jnp.bfloat16, jnp.float16)
    if head_dim % 16 or not (sixteen_bit or (interpret and q.dtype == _F32)):
        return attention_reference(q, k, v, **ref_kw)  # the kernels take 16-bit data, head dims in 16s

    bs = block_sizes or BlockSizes.get_default()
    scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
    interp = _interpret_params(interpret)
    static_offset = int(q_offset) if isinstance(q_offset, int) else None
    if static_offset is not None and static_offset < 0:
        raise ValueError(f"flash_attention_gpu: q_offset={q_offset} must be >= 0")

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
