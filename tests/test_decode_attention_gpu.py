"""Flash-decoding on Mosaic GPU (phi_jax/kernels/decode_attention_gpu.py) against the reference.

`TestInterpret` runs the kernel in Pallas's Mosaic GPU interpreter on the CPU; `TestGpu` runs the same cases
compiled and skips without a GPU. tests/test_attn_implementations.py lowers a cached decode step of the pallas
model for CUDA and checks that it carries this kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels.decode_attention_gpu import decode_attention_gpu, default_splits
from phi_jax.kernels.reference import attention_reference
from test_kernels_gpu import GpuOrInterpreted, _inputs, _rel


class DecodeCases(GpuOrInterpreted):

    def check(self, *, batch=2, t=1, s, n, kv, h, offset, dtype=jnp.float32, splits=None, valid=None, packed=False,
              jit_offset=False, seed=0):
        q, k, v, _ = _inputs(seed, batch, t, s, n, kv, h, dtype)
        kvseg = qseg = None
        if valid is not None:  # per row: keys [start, end) are valid (left padding, unwritten cache slots)
            kvseg = jnp.asarray(np.stack([(np.arange(s) >= a) & (np.arange(s) < b) for a, b in valid]), jnp.int32)
        if packed:  # two documents in the cache; the queries belong to the second
            ids = np.where(np.arange(s) < s // 2, 1, 2).astype(np.int32)
            kvseg = jnp.asarray(np.broadcast_to(ids, (batch, s)))
            qseg = jnp.full((batch, t), 2, jnp.int32)
        kw = dict(q_segment_ids=qseg, kv_segment_ids=kvseg)
        ref = attention_reference(q, k, v, q_offset=offset, **kw)
        if jit_offset:  # the offset traced, as in the compiled decode loop
            fn = jax.jit(lambda q, k, v, off: decode_attention_gpu(q, k, v, q_offset=off, num_splits=splits,
                                                                   interpret=self.INTERPRET, **kw))
            out = fn(q, k, v, jnp.int32(offset))
        else:
            out = decode_attention_gpu(q, k, v, q_offset=offset, num_splits=splits, interpret=self.INTERPRET, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert bool(jnp.all(jnp.isfinite(out)))
        tol = 2e-5 if dtype == jnp.float32 else 2e-2
        assert _rel(out, ref) <= tol, _rel(out, ref)
        return out

    def test_fp32_h80_one_query_left_padding_unwritten_slots(self):
        # row 0 left-padded by 9, both rows' cache written up to 200 of 256 slots; the query at slot 199
        self.check(s=256, n=4, kv=4, h=80, offset=199, valid=[(9, 200), (0, 200)], splits=3, jit_offset=True)

    def test_fp32_h64_gqa_8to2_len37_all_split_counts(self):
        for splits in (1, 2, None):
            self.check(s=37, n=8, kv=2, h=64, offset=36, splits=splits)

    def test_fp32_h80_three_queries_len129_offset_mid_cache(self):
        # queries at 100..102 of 129 slots: the splits past them see nothing and must weigh 0
        self.check(t=3, s=129, n=4, kv=2, h=80, offset=100, splits=2)

    def test_fp32_h64_fully_masked_row_gives_zeros(self):
        out = self.check(s=129, n=2, kv=2, h=64, offset=50, valid=[(60, 129), (0, 51)], splits=2)
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # row 0 sees no key at or before slot 50

    def test_fp32_h64_packed_documents_len1(self):
        self.check(s=1, n=2, kv=1, h=64, offset=0, valid=[(0, 1), (0, 1)])
        self.check(s=130, n=2, kv=1, h=64, offset=129, packed=True, splits=2)

    def test_bf16_h80_heads_32to32(self):
        self.check(batch=1, s=256, n=32, kv=32, h=80, offset=255, dtype=jnp.bfloat16)


class TestInterpret(DecodeCases):
    INTERPRET = True


class TestGpu(DecodeCases):
    INTERPRET = False


def test_default_splits_and_errors():
    assert default_splits(1, 32, 2048, 128) == 8  # phi-2 at batch 1: 256 CTAs
    assert default_splits(8, 32, 2048, 128) == 1
    assert default_splits(1, 2, 100, 128) == 1  # never more splits than key blocks
    assert default_splits(1, 32, 7 * 128, 128) == 7 and default_splits(1, 32, 11 * 128, 128) == 1  # divisors only
    q = jnp.zeros((1, 1, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="num_splits=0"):
        decode_attention_gpu(q, q, q, num_splits=0)
    with pytest.raises(ValueError, match="q_offset=-1"):
        decode_attention_gpu(q, q, q, q_offset=-1)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention_gpu(jnp.zeros((1, 1, 3, 16), jnp.bfloat16), q, q)
    q8 = jnp.ones((1, 1, 2, 8), jnp.float32)  # head_dim 8: the reference answers
    np.testing.assert_array_equal(np.asarray(decode_attention_gpu(q8, q8, q8)), np.asarray(attention_reference(q8, q8, q8)))

