"""The Mosaic GPU flash-attention kernel (phi_jax/kernels/flash_attention_gpu.py) against the reference.

`GpuKernelCases` runs the compiled kernels and skips without a GPU; `TestInterpret` runs the same cases in Pallas's
Mosaic GPU interpreter on the CPU (same kernels, TMA copies, barriers and masking; plain dots for the wgmmas).
`Warpgroups2Cases` (TestGpuWarpgroups2 / TestInterpretWarpgroups2) does the same for the warp-specialised forward,
`BlockSizes(warpgroups=2)`: three warpgroup threads per CTA, which the interpreter runs (about 3 s per CTA).
`HeadSplitCases` does it for `BlockSizes(head_split=True, bwd_head_split=True)` (head_dim 80 as 64 + 16, 112 as
64 + 48); the split (and the backward's paired products) is the default, so the plain cases at head_dim 80 run it
too. `BwdFormCases` runs the backward's other forms: unpaired, unsplit, both.
`test_export_cuda_*` lowers the compiled kernels for CUDA from this CPU and checks the Mosaic GPU custom calls.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels.flash_attention_gpu import BlockSizes, flash_attention_gpu
from phi_jax.kernels.reference import attention_reference


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def _inputs(seed, batch, t, s, n, kv, h, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, s, kv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, s, kv, h), jnp.float32).astype(dtype)
    cot = jax.random.normal(keys[3], (batch, t, n, h), jnp.float32)
    return q, k, v, cot


def _segments(kind, batch, t, s):
    """(q_segment_ids, kv_segment_ids) for a masking pattern."""
    if kind == "none":
        return None, None
    if kind == "left":  # row 0 left-padded by 9 keys: its first 9 queries see nothing (fully masked rows)
        kv = np.ones((batch, s), np.int32)
        kv[0, : min(9, s)] = 0
        if batch > 1:
            kv[1, s - s // 4:] = 0  # row 1 right-padded
        return None, jnp.asarray(kv)
    if kind == "packed":  # two documents then padding, queries carry their document id
        ids = np.where(np.arange(s) < s // 3, 1, np.where(np.arange(s) < s - 5, 2, 0)).astype(np.int32)
        ids = np.broadcast_to(ids, (batch, s))
        return jnp.asarray(ids[:, :t]), jnp.asarray(ids)
    raise ValueError(kind)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-2))


class GpuOrInterpreted:
    """Test cases that run compiled on a GPU (skipped without one) or, with INTERPRET = True, interpreted."""
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _need_backend(self):
        if not self.INTERPRET and not _has_gpu():
            pytest.skip("needs a GPU (the interpreted subclass runs these on the CPU)")


class _KernelCheck(GpuOrInterpreted):
    """check(): the kernel's output and gradients against the reference; skips without a GPU unless interpreted."""

    def check(self, *, batch=1, t, s, n, kv, h, dtype=jnp.float32, causal=True, kind="none", q_offset=0,
              grads=True, seed=0, jit_offset=False, block_sizes=None):
        q, k, v, cot = _inputs(seed, batch, t, s, n, kv, h, dtype)
        qseg, kvseg = _segments(kind, batch, t, s)
        kw = dict(q_segment_ids=qseg, kv_segment_ids=kvseg, causal=causal)
        tol = 2e-5 if dtype == jnp.float32 else 2e-2  # 16-bit inputs: P and dS are rounded to 16 bits too

        def run(fn, offset):
            def f(q, k, v):
                return fn(q, k, v, q_offset=offset, **kw)
            if not grads:
                return f(q, k, v), ()
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(cot.astype(out.dtype))

        kernel = lambda q, k, v, **a: flash_attention_gpu(q, k, v, interpret=self.INTERPRET,  # noqa: E731
                                                          block_sizes=block_sizes, **a)
        if jit_offset:  # q_offset as a traced scalar
            out, g = jax.jit(lambda off: run(kernel, off))(jnp.int32(q_offset))
        else:  # one compile for the forward and the backward
            out, g = jax.jit(lambda: run(kernel, q_offset))()
        ref, g_ref = run(attention_reference, q_offset)
        assert out.shape == ref.shape and out.dtype == q.dtype
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        errs = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(g, g_ref)]
        assert max(errs) <= tol, f"relative errors out/dq/dk/dv {errs} > {tol}"
        if kind == "left" and causal and q_offset == 0:  # queries before the first real key see nothing: exact zeros
            assert np.all(np.asarray(out[0, :9], np.float32) == 0.0)
            if grads:
                assert np.all(np.asarray(g[0][0, :9]) == 0.0)


class GpuKernelCases(_KernelCheck):
    def test_fp32_h64_gqa_8to2_len37_left_right_padding(self):
        self.check(batch=2, t=37, s=37, n=8, kv=2, h=64, kind="left")

    def test_fp32_h80_len129_packed_segments(self):
        self.check(t=129, s=129, n=2, kv=1, h=80, kind="packed", seed=1)

    def test_fp32_h80_noncausal_len129_padding(self):
        self.check(batch=2, t=129, s=129, n=1, kv=1, h=80, causal=False, kind="left", seed=2)

    def test_fp32_h64_noncausal_no_padding_len37_128(self):
        # nothing to mask (S a whole block, no segments): found by the kernel fuzz, where tracing the (empty) loop of
        # masked steps failed on the mask that is not there
        self.check(t=37, s=128, n=2, kv=1, h=64, causal=False, seed=3)
        # the same in bf16: what a GPU runs compiled (float32 falls back to the reference there)
        self.check(t=37, s=128, n=2, kv=1, h=64, causal=False, seed=3, dtype=jnp.bfloat16)

    def test_fp32_h80_prefill_traced_offset_padding(self):
        self.check(batch=2, t=37, s=129, n=2, kv=2, h=80, q_offset=92, kind="left", seed=4, jit_offset=True)

    def test_bf16_h80_heads_32to32_len1(self):
        self.check(t=1, s=1, n=32, kv=32, h=80, dtype=jnp.bfloat16, seed=5)

    def test_bf16_h80_heads_32to32_one_query_72_keys(self):
        # one query at position 71 (the last of 72 keys): unlike T = S = 1, the output mixes every key
        self.check(t=1, s=72, n=32, kv=32, h=80, q_offset=71, dtype=jnp.bfloat16, seed=9)

    def test_bf16_h80_gqa_8to2_len37_left_right_padding(self):
        self.check(batch=2, t=37, s=37, n=8, kv=2, h=80, dtype=jnp.bfloat16, kind="left", seed=10)

    def test_fp16_h64_len256(self):
        self.check(t=256, s=256, n=2, kv=1, h=64, dtype=jnp.float16, seed=7)

    def test_bf16_h80_gqa_8to2_len256_gpu(self):
        if self.INTERPRET:
            pytest.skip("covered piecewise above; too slow to interpret")
        self.check(batch=2, t=256, s=256, n=8, kv=2, h=80, dtype=jnp.bfloat16, kind="left", seed=8)

    def test_bf16_h64_packed_forward_other_blocks_gpu(self):
        if self.INTERPRET:
            pytest.skip("too slow to interpret")
        q, k, v, _ = _inputs(8, 1, 256, 256, 4, 2, 64, jnp.bfloat16)
        qseg, kvseg = _segments("packed", 1, 256, 256)
        bs = BlockSizes(block_q=64, block_kv=64, slots=3)
        out = flash_attention_gpu(q, k, v, q_segment_ids=qseg, kv_segment_ids=kvseg, block_sizes=bs)
        ref = attention_reference(q, k, v, q_segment_ids=qseg, kv_segment_ids=kvseg)
        assert _rel(out, ref) <= 2e-2


class TestGpu(GpuKernelCases):
    INTERPRET = False


class TestInterpret(GpuKernelCases):
    INTERPRET = True


class Warpgroups2Cases(_KernelCheck):
    """The forward with two consumer warpgroups per CTA (`BlockSizes(warpgroups=2)`) and a producer warpgroup;
    its log-sum-exp feeds the unchanged backward, so the gradients check it too. block_kv=64 makes the first
    warpgroup of a causal CTA need fewer key blocks than the second (its drain of the shared pipeline)."""

    def test_wg2_fp32_h80_gqa_4to1_len129_causal_left_padding(self):  # forward only: the backward is slow to interpret
        self.check(t=129, s=129, n=4, kv=1, h=80, kind="left", seed=11, grads=False,
                   block_sizes=BlockSizes(warpgroups=2, block_kv=64, head_split=False))

    def test_wg2_fp32_h64_len256_packed_segments(self):
        self.check(t=256, s=256, n=2, kv=1, h=64, kind="packed", seed=12, block_sizes=BlockSizes(warpgroups=2))

    def test_wg2_fp32_h80_prefill_q_offset(self):
        bs = BlockSizes(warpgroups=2, block_kv=64, overlap=False, head_split=False)
        self.check(batch=2, t=100, s=229, n=2, kv=1, h=80, q_offset=129, kind="left", seed=13, block_sizes=bs)
        self.check(t=37, s=129, n=2, kv=2, h=80, q_offset=92, seed=14, jit_offset=True, grads=False,
                   block_sizes=BlockSizes(warpgroups=2, head_split=False))

    def test_wg2_3_slots_fp32_h80_len256_causal_left_padding(self):  # 4 key blocks through 3 slots
        self.check(t=256, s=256, n=1, kv=1, h=80, kind="left", seed=16, grads=False,
                   block_sizes=BlockSizes(warpgroups=2, block_kv=64, slots=3, head_split=False))

    def test_wg2_bf16_h80_gqa_8to2_len256_gpu(self):
        if self.INTERPRET:
            pytest.skip("too slow to interpret")
        self.check(batch=2, t=256, s=256, n=8, kv=2, h=80, dtype=jnp.bfloat16, kind="left", seed=15,
                   block_sizes=BlockSizes(warpgroups=2, head_split=False))


class TestGpuWarpgroups2(Warpgroups2Cases):
    INTERPRET = False


class TestInterpretWarpgroups2(Warpgroups2Cases):
    INTERPRET = True


class HeadSplitCases(_KernelCheck):
    """`BlockSizes(head_split=True, bwd_head_split=True)`: a head dim that is not a multiple of 64 in a
    multiple-of-64 part and a 16..48-wide rest, in the forward, dq and dk/dv kernels (separate TMA copies and tiles
    per part, QK^T as a sum of per-part products, one accumulator per part for PV, dQ, dK, dV)."""

    def test_split_fp32_h80_len129_packed_segments(self):
        self.check(t=129, s=129, n=2, kv=1, h=80, kind="packed", seed=21,
                   block_sizes=BlockSizes(head_split=True, bwd_head_split=True))

    def test_split_fp32_h112_gqa_4to2_prefill_offset_padding(self):  # 112 = 64 + 48
        self.check(batch=2, t=37, s=129, n=4, kv=2, h=112, q_offset=92, kind="left", seed=22, jit_offset=True,
                   block_sizes=BlockSizes(head_split=True, bwd_head_split=True, overlap=False))

    def test_split_fp32_h80_noncausal_padding_two_warpgroups(self):
        self.check(t=129, s=129, n=2, kv=1, h=80, causal=False, kind="left", seed=23, grads=False,
                   block_sizes=BlockSizes(head_split=True, warpgroups=2, block_kv=64))

    def test_split_bf16_h80_gqa_8to2_len256_gpu(self):
        if self.INTERPRET:
            pytest.skip("too slow to interpret")
        for wgs in (1, 2):
            self.check(batch=2, t=256, s=256, n=8, kv=2, h=80, dtype=jnp.bfloat16, kind="left", seed=24,
                       block_sizes=BlockSizes(head_split=True, bwd_head_split=True, warpgroups=wgs))


class TestGpuHeadSplit(HeadSplitCases):
    INTERPRET = False


class TestInterpretHeadSplit(HeadSplitCases):
    INTERPRET = True


class BwdFormCases(_KernelCheck):
    """The backward's forms other than the default (which splits head_dim 80 as 64 + 16 and issues its independent
    products together, dq: S and dP; dk/dv: S^T and dP^T, then dV and dK, refilling a slot after both have read it):
    `bwd_paired=False` waits on each product in turn; `bwd_head_split=False` tiles the head dim 16 wide."""

    def test_unpaired_fp32_h64_gqa_8to2_len129_left_right_padding(self):  # 3 key blocks through 2 slots
        self.check(batch=2, t=129, s=129, n=8, kv=2, h=64, kind="left", seed=31,
                   block_sizes=BlockSizes(bwd_paired=False))

    def test_unpaired_split_fp32_h80_prefill_offset_packed(self):  # 80 = 64 + 16; GQA summed in dk/dv
        self.check(t=37, s=129, n=4, kv=2, h=80, q_offset=92, kind="packed", seed=32,
                   block_sizes=BlockSizes(bwd_paired=False, slots=3))

    def test_paired_unsplit_fp32_h80_noncausal_padding(self):
        self.check(t=65, s=129, n=2, kv=1, h=80, causal=False, kind="left", seed=33,
                   block_sizes=BlockSizes(bwd_head_split=False))

    def test_forms_bf16_h80_gqa_8to2_len256_gpu(self):
        if self.INTERPRET:
            pytest.skip("too slow to interpret")
        for paired, split in ((False, False), (False, True), (True, False)):
            self.check(batch=2, t=256, s=256, n=8, kv=2, h=80, dtype=jnp.bfloat16, kind="left", seed=34,
                       block_sizes=BlockSizes(bwd_paired=paired, head_split=split, bwd_head_split=split))


class TestGpuBwdForms(BwdFormCases):
    INTERPRET = False


class TestInterpretBwdForms(BwdFormCases):
    INTERPRET = True


def test_fallbacks_and_errors():
    q, k, v, _ = _inputs(0, 1, 5, 5, 2, 1, 8, jnp.float32)
    # head_dim 8 is not a multiple of 16: the reference answers
    np.testing.assert_array_equal(np.asarray(flash_attention_gpu(q, k, v)), np.asarray(attention_reference(q, k, v)))
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention_gpu(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="block_kv=96"):
        BlockSizes(block_kv=96)
    with pytest.raises(ValueError, match="warpgroups=3"):
        BlockSizes(warpgroups=3)
    with pytest.raises(ValueError, match="slots=2 only"):
        BlockSizes(warpgroups=2, head_split=True, slots=3)
    with pytest.raises(ValueError, match="pass head_split=False"):  # the head split is the default
        BlockSizes(warpgroups=2, slots=3)
    BlockSizes(warpgroups=2, slots=3, head_split=False)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention_gpu(q[0], k, v)
    q16, k16 = (jnp.zeros((1, 5, 2, 16), jnp.bfloat16) for _ in range(2))
    with pytest.raises(ValueError, match="q_offset=-1"):
        flash_attention_gpu(q16, k16, k16, q_offset=-1)


def _export_text(fn, *avals) -> str:
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"],
                            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
                                             jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu")])(*avals)
    return exp.mlir_module()


@pytest.mark.parametrize("head_dim", [64, 80])
def test_export_cuda_forward_and_backward(head_dim):
    q = jax.ShapeDtypeStruct((2, 200, 8, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, head_dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)

    def fwd(q, k, v, seg):
        return flash_attention_gpu(q, k, v, kv_segment_ids=seg)

    def bwd(q, k, v, seg):
        return jax.grad(lambda *a: jnp.sum(fwd(*a, seg).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    fwd_text = _export_text(fwd, q, k, k, seg)
    bwd_text = _export_text(bwd, q, k, k, seg)
    calls = lambda text: re.findall(r'mosaic_gpu\w*', text)  # noqa: E731
    assert calls(fwd_text), "no Mosaic GPU custom call in the forward"
    # forward (as the residual pass), dq and dk/dv kernels
    assert len(re.findall(r'stablehlo.custom_call @mosaic_gpu\w*', bwd_text)) >= 3
    assert len(re.findall(r'stablehlo.custom_call @mosaic_gpu\w*', fwd_text)) == 1


@pytest.mark.parametrize("head_dim", [64, 80])
def test_export_cuda_forward_two_warpgroups(head_dim):
    """BlockSizes(warpgroups=2) lowers for CUDA: the forward alone and under jax.vjp with the backward kernels."""
    q = jax.ShapeDtypeStruct((2, 200, 8, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, head_dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)

    def fwd(q, k, v, seg, warpgroups=2):
        return flash_attention_gpu(q, k, v, kv_segment_ids=seg, block_sizes=BlockSizes(warpgroups=warpgroups))

    def fwd_vjp(q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: fwd(*a, seg), q, k, v)
        return out, vjp(jnp.ones_like(out))

    calls = lambda text: re.findall(r'stablehlo.custom_call @mosaic_gpu\w*', text)  # noqa: E731
    fwd_text = _export_text(fwd, q, k, k, seg)
    vjp_text = _export_text(fwd_vjp, q, k, k, seg)
    assert len(calls(fwd_text)) == 1
    assert len(calls(vjp_text)) == 3  # the two-warpgroup forward, dq, dk/dv
    # the producer/consumer register split (setmaxnreg) is only in the warp-specialised kernel
    assert "nvvm.setmaxregister" in fwd_text and "nvvm.setmaxregister" in vjp_text
    assert "nvvm.setmaxregister" not in _export_text(functools.partial(fwd, warpgroups=1), q, k, k, seg)


@pytest.mark.parametrize("head_dim", [80, 112])
def test_export_cuda_head_split(head_dim):
    """BlockSizes(head_split=True) lowers for CUDA, one and two warpgroups, forward and backward; its copies of the
    multiple-of-64 part use an untiled view of the tile (a tiled one cannot address a slice of an 80-wide row)."""
    q = jax.ShapeDtypeStruct((2, 200, 8, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, head_dim), jnp.bfloat16)

    def fwd_vjp(q, k, v, warpgroups):
        bs = BlockSizes(head_split=True, bwd_head_split=True, warpgroups=warpgroups)
        out, vjp = jax.vjp(lambda *a: flash_attention_gpu(*a, block_sizes=bs), q, k, v)
        return out, vjp(jnp.ones_like(out))

    for warpgroups in (1, 2):
        text = _export_text(functools.partial(fwd_vjp, warpgroups=warpgroups), q, k, k)
        assert len(re.findall(r'stablehlo.custom_call @mosaic_gpu\w*', text)) == 3  # forward, dq, dk/dv


def _mosaic_calls(text: str) -> list[str]:
    """The Mosaic GPU custom calls of an exported module, each with its attributes (the serialized kernel)."""
    return [line.strip() for line in text.splitlines() if re.search(r"stablehlo.custom_call @mosaic_gpu", line)]


@pytest.mark.parametrize("head_dim", [64, 80])
def test_export_cuda_default_splits_every_kernel(head_dim):
    """The default BlockSizes splits a head dim that is not a multiple of 64 in the forward (measured 1.6x faster at
    head_dim 80 on an H200) and in the backward kernels (with the paired products, 1.06x on forward + backward): at
    head_dim 80 each of the default's three kernels differs from the 16-wide form's, and `bwd_head_split=False`
    changes only the dq and dk/dv kernels; at head_dim 64 there is nothing to split and all are equal."""
    q = jax.ShapeDtypeStruct((1, 200, 4, head_dim), jnp.bfloat16)

    def fwd_vjp(q, k, v, bs):
        out, vjp = jax.vjp(lambda *a: flash_attention_gpu(*a, block_sizes=bs), q, k, v)
        return out, vjp(jnp.ones_like(out))

    default, unsplit, fwd_split = (
        _mosaic_calls(_export_text(functools.partial(fwd_vjp, bs=bs), q, q, q))
        for bs in (BlockSizes(), BlockSizes(head_split=False, bwd_head_split=False),
                   BlockSizes(bwd_head_split=False)))
    assert len(default) == len(unsplit) == 3  # forward, dq, dk/dv
    assert all((d != u) == (head_dim == 80) for d, u in zip(default, unsplit))
    assert fwd_split[0] == default[0] and fwd_split[1:] == unsplit[1:]


@pytest.mark.parametrize("head_dim,split", [(64, False), (80, False), (80, True)])
def test_export_cuda_bwd_paired(head_dim, split):
    """BlockSizes(bwd_paired=True) (the default) lowers for CUDA (two accumulators in flight, register and
    shared-memory A operands), and its backward kernels are not the unpaired form's."""
    q = jax.ShapeDtypeStruct((2, 200, 8, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, head_dim), jnp.bfloat16)

    def fwd_vjp(q, k, v, paired):
        bs = BlockSizes(bwd_paired=paired, head_split=split, bwd_head_split=split)
        out, vjp = jax.vjp(lambda *a: flash_attention_gpu(*a, block_sizes=bs), q, k, v)
        return out, vjp(jnp.ones_like(out))

    paired, unpaired = (_export_text(functools.partial(fwd_vjp, paired=p), q, k, k) for p in (True, False))
    assert len(re.findall(r'stablehlo.custom_call @mosaic_gpu\w*', paired)) == 3  # forward, dq, dk/dv
    assert paired != unpaired


@pytest.mark.parametrize("stages,paired", [(("bwd_mm",), True), (("bwd_exp",), False),
                                           (("qk", "pv", "exp", "mask", "bwd_mm", "bwd_exp"), False)])
def test_export_cuda_ablations(stages, paired):
    """The profiling forms (`BlockSizes.ablate`, benchmarks/gpu_attention.py --ablate) lower for CUDA, forward and
    backward, so that a GPU session's profile does not fail on them; an unknown stage is refused."""
    q = jax.ShapeDtypeStruct((1, 200, 4, 80), jnp.bfloat16)
    bs = BlockSizes(ablate=frozenset(stages), bwd_paired=paired, bwd_head_split=True)

    def fwd_vjp(q, k, v):
        out, vjp = jax.vjp(lambda *a: flash_attention_gpu(*a, block_sizes=bs), q, k, v)
        return out, vjp(jnp.ones_like(out))

    assert len(re.findall(r'stablehlo.custom_call @mosaic_gpu\w*', _export_text(fwd_vjp, q, q, q))) == 3
    with pytest.raises(ValueError, match="unknown stages"):
        BlockSizes(ablate=frozenset({"bwd_everything"}))
