"""decode_attention (flash-decoding, Pallas Mosaic TPU) in Pallas's interpreter against the reference, and
its lowering for TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels.decode_attention import decode_attention
from phi_jax.kernels.reference import attention_reference


@pytest.mark.parametrize("b, t, s, n, kv, h, offset, dtype, kw", [
    (3, 1, 1000, 8, 2, 64, 700, jnp.float32, {}),  # GQA 8:2, a cache longer than what is written, 2 splits
    (2, 4, 300, 4, 4, 80, 200, jnp.float32, dict(block_k=128, num_splits=2)),  # 4 queries, uneven splits
    (2, 1, 1024, 8, 8, 80, 1023, jnp.bfloat16, {}),  # one query per head (phi-2's MHA), full cache
    (2, 3, 256, 4, 2, 64, 10, jnp.float32, dict(causal=False)),
])
def test_matches_reference(b, t, s, n, kv, h, offset, dtype, kw):
    keys = jax.random.split(jax.random.key(s + t), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, kv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kv, h), jnp.float32).astype(dtype)
    kv_ids = np.ones((b, s), np.int32)
    kv_ids[0, :7] = 0  # left padding
    kv_ids[:, offset + t:] = 0  # slots not written yet
    if b > 2:
        kv_ids[2] = 0  # a row with no valid key: zeros
    args = dict(q_segment_ids=jnp.ones((b, t), jnp.int32), kv_segment_ids=jnp.asarray(kv_ids), **kw)
    got = jax.jit(lambda q, k, v, off: decode_attention(q, k, v, q_offset=off, interpret=True, **args))(
        q, k, v, jnp.int32(offset))
    want = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), q_offset=offset,
                               **{k_: v_ for k_, v_ in args.items() if k_ not in ("block_k", "num_splits")})
    assert got.dtype == dtype and got.shape == q.shape
    a, r = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if dtype == jnp.float32:
        assert np.max(np.abs(a - r)) / np.max(np.abs(r)) <= 2e-5
    else:
        assert np.linalg.norm(a - r) / np.linalg.norm(r) <= 2e-2
    if b > 2:
        assert not a[2].any()


@pytest.mark.parametrize("h", [64, 80])
def test_lowers_for_tpu(h):
    q = jax.ShapeDtypeStruct((4, 1, 32, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((4, 2048, 32, h), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((4, 2048), jnp.int32)

    def f(q, k, v, ids, off):
        return decode_attention(q, k, v, kv_segment_ids=ids, q_offset=off)

    text = jax.export.export(jax.jit(f), platforms=["tpu"])(q, k, k, ids, jax.ShapeDtypeStruct((), jnp.int32))
    assert 'kernel_name = "phi_decode_attention"' in text.mlir_module()
