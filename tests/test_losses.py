"""The loss and softmax forms the train step differentiates: same values as the textbook forms, and gradients
equal to JAX's differentiation of those forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.modeling.attention import _softmax
from phi_jax.modeling.losses import IGNORE_INDEX, cross_entropy, shift_labels, token_nll
from phi_jax.train.step import token_losses


def _logits_and_labels(seed=0, b=3, t=7, v=50):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((b, t, v)) * 4, jnp.float32)
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    labels[0, 2] = labels[2, 5] = IGNORE_INDEX
    return logits, jnp.asarray(labels)


def _reference_nll(logits, labels):  # -log_softmax gathered at the label, ignored labels 0
    valid = labels != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0)


def test_token_nll_values_and_gradient():
    logits, labels = _logits_and_labels()
    nll, valid = token_nll(logits, labels)
    np.testing.assert_array_equal(valid, labels != IGNORE_INDEX)
    np.testing.assert_allclose(nll, _reference_nll(logits, labels), rtol=1e-6, atol=1e-6)
    assert float(nll[0, 2]) == 0.0 and float(nll[2, 5]) == 0.0
    g = jax.grad(lambda x: jnp.sum(token_nll(x, labels)[0]))(logits)
    g_ref = jax.grad(lambda x: jnp.sum(_reference_nll(x, labels)))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    # softmax - one-hot on counted rows, nothing on ignored ones
    np.testing.assert_array_equal(g[0, 2], 0.0)
    onehot = jax.nn.one_hot(labels[1, 3], logits.shape[-1])
    np.testing.assert_allclose(g[1, 3], jax.nn.softmax(logits[1, 3]) - onehot, atol=1e-7)


def test_a_label_outside_the_vocabulary_gives_nan():
    logits, labels = _logits_and_labels(seed=3)
    for bad in (logits.shape[-1], -3):
        nll, _ = token_nll(logits, labels.at[1, 4].set(bad))
        assert np.isnan(float(nll[1, 4]))
        np.testing.assert_array_equal(np.isnan(np.asarray(nll)).sum(), 1)  # only that label


def test_token_losses_shift_the_labels_not_the_logits():
    logits, labels = _logits_and_labels(seed=1)
    total, count = token_losses(logits, labels)
    want = _reference_nll(logits[:, :-1], labels[:, 1:])
    np.testing.assert_allclose(total, jnp.sum(want), rtol=1e-6)
    assert int(count) == int(jnp.sum(labels[:, 1:] != IGNORE_INDEX))
    np.testing.assert_array_equal(shift_labels(labels)[:, -1], IGNORE_INDEX)
    np.testing.assert_allclose(cross_entropy(logits, shift_labels(labels)), total / count, rtol=1e-6)


def test_softmax_forward_is_jax_softmax_and_its_gradient_the_same():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 9)) * 3, jnp.float32)
    x = x.at[0, 1, 2].set(jnp.finfo(jnp.float32).min)  # a fully masked row, as attention writes it
    x = x.at[1, 0, :, :4].set(jnp.finfo(jnp.float32).min)  # masked keys
    np.testing.assert_array_equal(_softmax(x), jax.nn.softmax(x, axis=-1))
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(_softmax(x) * w)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(jax.nn.softmax(x, axis=-1) * w)))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g[1, 0, :, :4]) == 0.0)  # no gradient reaches a masked key
