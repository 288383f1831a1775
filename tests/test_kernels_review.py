"""The kernels' public wrappers called directly: inputs outside the contract of `phi_jax.kernels.reference` are
one-line ValueErrors naming the argument (before any Pallas tracing), and the edge cases the contract defines
(no queries, no keys) give its answer. Tiny shapes: everything interpreted runs on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels.decode_attention import decode_attention
from phi_jax.kernels.decode_attention_gpu import decode_attention_gpu
from phi_jax.kernels.flash_attention_gpu import BlockSizes, flash_attention_gpu
from phi_jax.kernels.flash_attention_tpu import flash_attention_tpu
from phi_jax.kernels.reference import attention_reference

WRAPPERS = {
    "flash_attention_gpu": lambda *a, **kw: flash_attention_gpu(*a, interpret=True, **kw),
    "flash_attention_tpu": lambda *a, **kw: flash_attention_tpu(*a, interpret=True, **kw),
    "decode_attention": lambda *a, **kw: decode_attention(*a, interpret=True, **kw),
    "decode_attention_gpu": lambda *a, **kw: decode_attention_gpu(*a, interpret=True, **kw),
}


def _qkv(b=1, t=2, n=2, s=8, kv=1, h=16, dtype=jnp.float32):
    r = np.random.default_rng(0)
    return tuple(jnp.asarray(r.standard_normal(shape), dtype) for shape in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_zero_heads_or_head_dim_is_a_value_error(name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{name}: heads and head_dim must be >= 1"):
        WRAPPERS[name](q, k[:, :, :0], v[:, :, :0])  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        WRAPPERS[name](q[..., :0], k[..., :0], v[..., :0])


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_no_queries_or_no_keys_give_the_contracts_answer(name):
    q, k, v = _qkv()
    out = WRAPPERS[name](q[:, :0], k, v)  # was a ZeroDivisionError
    assert out.shape == (1, 0, 2, 16) and out.dtype == q.dtype
    out = WRAPPERS[name](q, k[:, :0], v[:, :0], causal=False)  # was a ZeroDivisionError (the GPU ones: a hang)
    assert out.shape == q.shape and not np.asarray(out).any()  # a query that sees no key: zeros
    out = WRAPPERS[name](q[:0], k[:0], v[:0])
    assert out.shape == (0, 2, 2, 16)


def test_reference_with_no_keys_gives_zeros():
    q, k, v = _qkv()
    out = attention_reference(q, k[:, :0], v[:, :0])  # was "zero-size array to reduction operation max"
    assert out.shape == q.shape and not np.asarray(out).any()


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_q_offset_must_be_one_non_negative_integer(name):
    q, k, v = _qkv(b=2)
    with pytest.raises(ValueError, match=f"{name}: q_offset must be an int .* shape \\(2,\\)"):
        WRAPPERS[name](q, k, v, q_offset=jnp.array([1, 2]))  # was an opaque broadcasting/reshape TypeError
    with pytest.raises(ValueError, match="q_offset must be an int"):
        WRAPPERS[name](q, k, v, q_offset=1.5)  # was truncated silently
    with pytest.raises(ValueError, match=f"{name}: q_offset=-1 must be >= 0"):
        WRAPPERS[name](q, k, v, q_offset=jnp.int32(-1))  # a concrete array: its value is known


@pytest.mark.parametrize("name", ["flash_attention_tpu", "decode_attention"])
def test_negative_int_q_offset_is_a_value_error_on_tpu(name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{name}: q_offset=-3 must be >= 0"):  # the GPU wrappers already said so
        WRAPPERS[name](q, k, v, q_offset=-3)


def test_negative_q_offset_on_the_gpu_decode_fallback():
    q, k, v = _qkv()  # float32 outside interpret mode: the reference answers, but the offset is still checked
    with pytest.raises(ValueError, match="decode_attention_gpu: q_offset=-1 must be >= 0"):
        decode_attention_gpu(q, k, v, q_offset=-1)


def test_traced_q_offset_still_works():
    q, k, v = _qkv()
    got = jax.jit(lambda off: decode_attention(q, k, v, q_offset=off, interpret=True))(jnp.int32(3))
    want = attention_reference(q, k, v, q_offset=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_float_segment_ids_are_a_value_error(name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{name}: kv_segment_ids must be integer .* float32"):
        WRAPPERS[name](q, k, v, kv_segment_ids=jnp.full((1, 8), 0.5))  # kernels truncated 0.5 to 0, the reference not
    with pytest.raises(ValueError, match="q_segment_ids must be integer"):
        WRAPPERS[name](q, k, v, q_segment_ids=jnp.ones((1, 2)), kv_segment_ids=jnp.ones((1, 8), jnp.int32))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_integer_inputs_are_a_value_error(name):
    q, k, v = _qkv(dtype=jnp.int32)
    with pytest.raises(ValueError, match=f"{name}: q, k, v must be floating point, got int32"):
        WRAPPERS[name](q, k, v)  # was an int32 output, silently


def test_block_sizes_of_the_wrong_kind():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="flash_attention_gpu: block_sizes must be a flash_attention_gpu.BlockSizes"):
        flash_attention_gpu(q, k, v, block_sizes=(64, 128), interpret=True)  # was an AttributeError
    with pytest.raises(ValueError, match="decode_attention_gpu: block_sizes must be"):
        decode_attention_gpu(q, k, v, block_sizes=(64, 128), interpret=True)
    for bad in (BlockSizes(), (0, 128), (16,), (16.0, 128)):
        with pytest.raises(ValueError, match="flash_attention_tpu: block_sizes=.* must be a pair"):
            flash_attention_tpu(q, k, v, block_sizes=bad, interpret=True)  # were unpacking/ZeroDivision errors
    for kw, culprit in ((dict(block_k=0), "block_k=0"), (dict(block_k=-128), "block_k=-128"),
                        (dict(num_splits=0), "num_splits=0"), (dict(num_splits=-1), "num_splits=-1"),
                        (dict(num_splits=1.5), "num_splits=1.5")):
        with pytest.raises(ValueError, match=f"decode_attention: {culprit} must be a positive integer"):
            decode_attention(q, k, v, interpret=True, **kw)  # 0 meant the default, silently; -128 broke the grid


def test_decode_gpu_with_two_warpgroups_matches_reference():
    q, k, v = _qkv(t=1, n=1, s=100)  # was NaN: the queries were padded to block_q, a CTA reads 2 * block_q rows
    got = decode_attention_gpu(q, k, v, q_offset=99, block_sizes=BlockSizes(warpgroups=2), interpret=True)
    want = attention_reference(q, k, v, q_offset=99)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("option, value, low", [("--batch", "0", 1), ("--seq-len", "0", 1), ("--new-tokens", "-1", 0)])
def test_check_names_the_option_of_a_bad_count(tmp_path, capsys, option, value, low):
    from phi_jax.cli import main
    (tmp_path / "config.json").write_text("{}")  # never read: the options are checked first
    assert main(["check", "--model", str(tmp_path), option, value]) == 2
    assert f"error: {option} must be >= {low}, got {value}" in capsys.readouterr().err  # was "seq_len must be ..."


def test_check_parity_refuses_a_negative_seed_before_loading(tmp_path):
    from phi_jax.parity import check_parity
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        check_parity(tmp_path / "missing", seed=-1)  # was: the path error, or numpy's after loading both models
