"""attend_xla: the causal block split computes the same function as the full square; masked keys, ids and cache
slots never change a real position (NaN, inf and out-of-range ids included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.modeling.attention import attend_xla, get_attention_fn
from phi_jax.modeling.model import build_mask


@pytest.mark.parametrize("t, n, kv", [(300, 4, 2), (1024, 2, 2), (256, 3, 1)])
def test_causal_blocks_equal_full(t, n, kv):
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (2, t, n, 16))
    k = jax.random.normal(keys[1], (2, t, kv, 16))
    v = jax.random.normal(keys[2], (2, t, kv, 16))
    pad = np.ones((2, t), bool)
    pad[1, t - 37:] = False
    mask = build_mask(jnp.asarray(pad), 2, t, t, None)
    full = attend_xla(q, k, v, mask)
    blocked = attend_xla(q, k, v, mask, causal=True, min_block=64)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), rtol=1e-5, atol=1e-5)
    # and the full path is real attention: compare with a per-head numpy reference
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    kn, vn = np.repeat(kn, n // kv, axis=2), np.repeat(vn, n // kv, axis=2)
    s = np.einsum("btnh,bsnh->bnts", qn, kn) / 4.0
    s = np.where(np.asarray(mask), s, -np.inf)
    with np.errstate(invalid="ignore"):  # the rows that see nothing are NaN here and not compared
        p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vn)
    seen = np.asarray(mask).any(-1)[:, 0]  # [B, T]: right-padding queries see the real keys, as transformers
    assert seen.all()
    np.testing.assert_allclose(np.asarray(full)[seen], ref[seen], rtol=1e-4, atol=1e-4)


def test_unknown_implementation():
    with pytest.raises(ValueError, match="'flash9'"):
        get_attention_fn("flash9")


# ---- masked positions can never change real ones ----------------------------------------------------

from flax import nnx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import phi_jax  # noqa: E402
from phi_jax.config import PhiConfig  # noqa: E402

POISON = (np.nan, np.inf, -np.inf, 3e38, -3e38)


def _padding(rng, b: int, t: int) -> np.ndarray:
    """`[B, T]` bool: each row left- or right-padded to a random length (0 = a fully padded row)."""
    mask = np.zeros((b, t), bool)
    for row in range(b):
        n = int(rng.integers(0, t + 1))
        if rng.random() < 0.5:
            mask[row, t - n:] = True
        else:
            mask[row, :n] = True
    return mask


def _poison(rng, x: np.ndarray, where: np.ndarray) -> np.ndarray:
    """x with NaN / inf / huge values at the `[B, S]` positions `where` (every head and channel)."""
    junk = rng.choice(POISON, size=x.shape).astype(x.dtype)
    return np.where(where[:, :, None, None], junk, x)


@settings(max_examples=12, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(b=st.just(3), t=st.sampled_from([1, 7, 33]), n_kv=st.sampled_from([(1, 1), (4, 2), (4, 1), (3, 3)]),
       h=st.sampled_from([16, 80]), seed=st.integers(0, 2 ** 32 - 1), causal=st.booleans())
def test_masked_keys_never_reach_real_queries(b, t, n_kv, h, seed, causal):
    """NaN, inf or huge keys and values at padded positions leave every real query's output bit-identical, and a
    query that sees no key gives zeros; on the full square and on the causal block split."""
    n, kv = n_kv
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, h)).astype(np.float32)
    v = rng.standard_normal((b, t, kv, h)).astype(np.float32)
    pad = _padding(rng, b, t)
    mask = build_mask(jnp.asarray(pad), b, t, t, 0)
    attend = jax.jit(attend_xla, static_argnames=("causal", "min_block"))
    clean = np.asarray(attend(q, k, v, mask, causal=causal, min_block=8))
    dirty = np.asarray(attend(q, _poison(rng, k, ~pad), _poison(rng, v, ~pad), mask, causal=causal, min_block=8))
    np.testing.assert_array_equal(dirty[pad], clean[pad])
    assert np.isfinite(clean[pad]).all()
    sees_nothing = ~np.asarray(mask).any(axis=-1)[:, 0]  # [B, T]
    np.testing.assert_array_equal(dirty[sees_nothing], 0.0)


def _tiny_model(**overrides):
    config = PhiConfig(**{**dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                 rope_parameters=dict(partial_rotary_factor=0.5)), **overrides})
    return phi_jax.PhiForCausalLM(config, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward_with_cache(graphdef, state, ids, mask, cache, cache_index):
    out = nnx.merge(graphdef, state).__call__(ids, mask, cache=cache, cache_index=cache_index)
    return out.logits, out.cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).__call__(ids, mask).logits


_MODEL = {}


def _model_state():
    if not _MODEL:
        _MODEL["split"] = nnx.split(_tiny_model())
    return _MODEL["split"]


@settings(max_examples=20, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_junk_ids_at_masked_positions_leave_real_logits_bit_identical(seed):
    """Any id at a masked position (out of range or negative included) changes no real position's logits, and
    the model accepts it (it never reads it); the concrete eager call checks only real ids."""
    graphdef, state = _model_state()
    rng = np.random.default_rng(seed)
    b, t, vocab = 3, 12, 50
    pad = _padding(rng, b, t)
    ids = rng.integers(0, vocab, (b, t))
    junk_a = np.where(pad, ids, rng.integers(-3, 60000, (b, t)))
    junk_b = np.where(pad, ids, rng.integers(-3, 60000, (b, t)))
    a = np.asarray(_forward(graphdef, state, jnp.asarray(junk_a), jnp.asarray(pad)))
    c = np.asarray(_forward(graphdef, state, jnp.asarray(junk_b), jnp.asarray(pad)))
    np.testing.assert_array_equal(a[pad], c[pad])
    assert np.isfinite(a[pad]).all()


def test_eager_call_checks_only_real_ids():
    model = _tiny_model(num_hidden_layers=1)
    pad = np.array([[False, True, True]])
    model(jnp.asarray([[50256, 3, 4]]), jnp.asarray(pad))  # the out-of-range id is masked: accepted
    with pytest.raises(ValueError, match="token id 50256 at position \\(0, 1\\)"):
        model(jnp.asarray([[3, 50256, 4]]), jnp.asarray(pad))
    with pytest.raises(ValueError, match="token id 50256"):
        model(jnp.asarray([[50256, 3, 4]]))  # no mask: every id is real


@settings(max_examples=15, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_nan_in_cache_at_masked_slots_leaves_real_logits_bit_identical(seed):
    """Prefill left/right-padded prompts into a cache, poison every masked slot of every layer's keys and values
    (padding and not yet written slots) with NaN / inf, decode one token: bit-identical to the clean cache."""
    graphdef, state = _model_state()
    rng = np.random.default_rng(seed)
    b, t, s, kv, h = 3, 8, 12, 2, 8
    pad = _padding(rng, b, t)
    pad[:, -1] = True  # the decode step below reads the prompt's last column as a real token
    slots = np.zeros((b, s), bool)
    slots[:, :t] = pad
    zeros = tuple((jnp.zeros((b, s, kv, h)), jnp.zeros((b, s, kv, h))) for _ in range(2))
    ids = jnp.asarray(rng.integers(0, 50, (b, t)))
    _, cache = _forward_with_cache(graphdef, state, ids, jnp.asarray(slots), zeros, 0)
    slots[:, t] = True
    step = jnp.asarray(rng.integers(0, 50, (b, 1)))
    clean, _ = _forward_with_cache(graphdef, state, step, jnp.asarray(slots), cache, t)
    poisoned = tuple((jnp.asarray(_poison(rng, np.asarray(k), ~slots)),
                      jnp.asarray(_poison(rng, np.asarray(v), ~slots))) for k, v in cache)
    dirty, _ = _forward_with_cache(graphdef, state, step, jnp.asarray(slots), poisoned, t)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    assert np.isfinite(np.asarray(clean)).all()
