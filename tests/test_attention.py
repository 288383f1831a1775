"""attend_xla: the causal block split computes the same function as the full square."""

from __future__ import annotations

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
    seen = np.asarray(mask).any(-1)[:, 0]  # [B, T]: padding queries see nothing (their output is unspecified)
    assert seen.sum() == 2 * t - 37
    np.testing.assert_allclose(np.asarray(full)[seen], ref[seen], rtol=1e-4, atol=1e-4)


def test_unknown_implementation():
    with pytest.raises(ValueError, match="'flash9'"):
        get_attention_fn("flash9")
