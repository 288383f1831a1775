"""flash_attention_tpu (Pallas Mosaic TPU) in Pallas's interpreter against the reference: outputs and the
gradients of q, k, v; and its lowering for TPU (the Mosaic custom calls of the forward and both backward
kernels)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels.flash_attention_tpu import flash_attention_tpu
from phi_jax.kernels.reference import attention_reference


def _inputs(seed, b, t, s, n, kv, h, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, kv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kv, h), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (b, t, n, h), jnp.float32).astype(dtype)
    return q, k, v, do


def _segments(b, t, s, offset, kind):
    """(q_segment_ids, kv_segment_ids) numpy, or (None, None). Row 0 left-padded, the last row fully padded."""
    if kind is None:
        return None, None
    kv = np.ones((b, s), np.int32)
    kv[0, :min(5, s - 1)] = 0  # left padding (row 0 keeps at least one key)
    if kind == "packed":  # two documents in row 1 (or 0)
        kv[min(1, b - 1), s // 2:] = 2
    if b > 1:
        kv[b - 1] = 0  # a fully padded row: every query sees nothing
    q = kv[:, offset:offset + t] if offset + t <= s else np.ones((b, t), np.int32)
    return q, kv


def _value_and_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of sum(fn(q, k, v) * do), all under one jit."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


CASES = [
    # b, t, s, n, kv, h, offset, segments, causal, dtype
    (2, 37, 37, 8, 2, 64, 0, "pad", True, jnp.float32),  # GQA 8:2, padding with a fully padded row
    (1, 129, 129, 32, 32, 64, 0, None, True, jnp.float32),  # 32:32, a partial second block
    (2, 256, 256, 8, 2, 80, 0, "packed", True, jnp.float32),  # head_dim 80, packed documents, 2x2 blocks
    (2, 1, 1, 4, 2, 80, 0, "pad", True, jnp.float32),  # length 1
    (2, 37, 129, 4, 2, 64, 92, "pad", True, jnp.float32),  # prefill into a cache: queries at [92, 129)
    (2, 37, 37, 4, 2, 64, 0, "pad", False, jnp.float32),  # not causal
    (2, 129, 129, 8, 2, 80, 0, "pad", True, jnp.bfloat16),
    (2, 37, 37, 4, 2, 64, 0, "pad", True, jnp.float16),
]


@pytest.mark.parametrize("b, t, s, n, kv, h, offset, segments, causal, dtype", CASES)
def test_matches_reference(b, t, s, n, kv, h, offset, segments, causal, dtype):
    q, k, v, do = _inputs(t * 31 + s + n, b, t, s, n, kv, h, dtype)
    q_ids, kv_ids = _segments(b, t, s, offset, segments)
    kw = dict(q_segment_ids=None if q_ids is None else jnp.asarray(q_ids),
              kv_segment_ids=None if kv_ids is None else jnp.asarray(kv_ids), causal=causal, q_offset=offset)
    got = _value_and_grads(functools.partial(flash_attention_tpu, interpret=True, **kw), q, k, v, do)
    # The reference in float32 on the same (rounded) inputs: bf16 is judged against the exact answer.
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = _value_and_grads(functools.partial(attention_reference, **kw), *f32)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, name
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        assert np.isfinite(a).all(), name
        if dtype == jnp.float32:
            # a floor for gradients that cancel to ~0 (one visible key: dk = dq = 0 up to rounding)
            err = np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 0.1)
            assert err <= 2e-5, (name, err)
        else:
            err = np.linalg.norm(a - r) / np.linalg.norm(r)
            assert err <= 2e-2, (name, err)
    if kv_ids is not None and b > 1:  # the fully padded row: zeros and no gradient
        assert not np.asarray(got[0][b - 1], np.float32).any()
        assert not np.asarray(got[1][b - 1], np.float32).any()


def test_q_offset_traced_and_block_sizes():
    """A traced q_offset (a cache index inside jit) and explicit blocks give the reference's answer."""
    b, t, s, n, kv, h = 1, 16, 300, 4, 2, 64
    q, k, v, _ = _inputs(7, b, t, s, n, kv, h, jnp.float32)
    f = jax.jit(lambda q, k, v, off: flash_attention_tpu(q, k, v, q_offset=off, block_sizes=(16, 256),
                                                         interpret=True))
    for off in (150, 284):
        got = f(q, k, v, jnp.int32(off))
        want = attention_reference(q, k, v, q_offset=off)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_rejects_bad_shapes():
    q = jnp.zeros((1, 8, 3, 64))
    k = jnp.zeros((1, 8, 2, 64))
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention_tpu(q, k, k, interpret=True)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        flash_attention_tpu(q, jnp.zeros((1, 8, 1, 64)), jnp.zeros((1, 8, 1, 64)),
                            kv_segment_ids=jnp.ones((1, 7), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        flash_attention_tpu(q, jnp.zeros((1, 8, 1, 64)), jnp.zeros((1, 8, 1, 64)), block_sizes=(12, 128))


@pytest.mark.parametrize("h", [64, 80])
def test_lowers_for_tpu(h):
    """Forward and backward export for TPU from this CPU and carry our three Mosaic kernels."""
    q = jax.ShapeDtypeStruct((2, 300, 8, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 300, 2, h), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def fwd(q, k, v, seg, off):
        return flash_attention_tpu(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offset=off)

    off = jax.ShapeDtypeStruct((), jnp.int32)
    text = jax.export.export(jax.jit(fwd), platforms=["tpu"])(q, k, k, seg, off).mlir_module()
    assert text.count("tpu_custom_call") == 1 and 'kernel_name = "phi_flash_attention_fwd"' in text
    grad = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    text = jax.export.export(jax.jit(grad), platforms=["tpu"])(q, k, k, seg, off).mlir_module()
    for name in ("fwd", "dkv", "dq"):
        assert f'kernel_name = "phi_flash_attention_{name}"' in text, name
