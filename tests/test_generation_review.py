"""Generation API review: settings, inputs and streams a user of `generate`, `generate_stream` and `compiled` can
pass that gave a silent wrong result, a deferred error or an error that did not name the culprit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phi_jax
from phi_jax.generation.sampling import Sampling, make_sampler

IDS = np.array([[4, 5, 6, 7], [8, 9, 10, 11]])


def _config(**overrides):
    settings = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=50,
                    bos_token_id=None, eos_token_id=None)
    return phi_jax.phi_2(**{**settings, **overrides})


@pytest.fixture(scope="module")
def model():
    return phi_jax.PhiForCausalLM(_config(), rngs=nnx.Rngs(0))


def _fixed_logits_model(logits):
    """A PhiForCausalLM whose next-token logits are `logits` whatever the input (lm_head = its bias)."""
    m = phi_jax.PhiForCausalLM(_config(vocab_size=len(logits)), rngs=nnx.Rngs(0))
    m.lm_head.kernel[...] = jnp.zeros_like(m.lm_head.kernel[...])
    m.lm_head.bias[...] = jnp.asarray(logits, jnp.float32)
    return m


@pytest.mark.parametrize("temperature", [float("inf"), 1e39])
def test_non_finite_temperature_is_refused(model, temperature):
    """Before: temperature=inf (or 1e39, inf in float32) was accepted and drew every token with equal probability,
    silently, from generate and generate_stream alike."""
    for fn in (model.generate, lambda *a, **k: list(model.generate_stream(*a, **k))):
        with pytest.raises(ValueError, match=r"temperature must be finite .*got (inf|1e\+39)"):
            fn(IDS, max_new_tokens=2, do_sample=True, temperature=temperature)
    for top_p in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="top_p"):
            model.generate(IDS, max_new_tokens=2, do_sample=True, top_p=top_p)


def test_tiny_temperature_draws_the_most_likely_token():
    """Before: logits / temperature overflowed for a tiny temperature (every logit +-inf, NaN probabilities) and
    the draw was token 0 (the first inf), not the most likely token 1; a temperature that float32 rounds to 0 or
    to a subnormal was accepted. Now such a row is shifted first (a near-greedy draw) and those are refused."""
    logits = jnp.array([[50.0, 100.0, 40.0, 99.0]])
    for kw in (dict(), dict(top_k=2), dict(top_p=0.9)):
        sampler = Sampling(temperature=1e-37, **kw)
        for seed in range(4):
            assert int(sampler.next_tokens(logits, jax.random.key(seed))[0]) == 1, (kw, seed)
    out = _fixed_logits_model([50.0, 100.0, 40.0, 99.0]).generate(
        np.zeros((2, 3), np.int32), max_new_tokens=4, do_sample=True, temperature=1e-37, seed=[1, 2])
    np.testing.assert_array_equal(out[:, 3:], 1)
    # an ordinary temperature still divides exactly
    np.testing.assert_array_equal(Sampling(temperature=0.5).filter_logits(logits), logits / 0.5)
    for temperature in (1e-40, 1e-300):
        with pytest.raises(ValueError, match=r"temperature .* is below float32's smallest normal"):
            make_sampler(True, temperature)
    with pytest.raises(ValueError, match="for greedy decoding use do_sample=False"):
        make_sampler(True, 0.0)


def test_stream_checks_its_arguments_when_created(model):
    """Before: generate_stream was a generator function, so a bad argument raised only at the first `next`, far
    from the call that passed it (and not at all for a stream never iterated)."""
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_stream(IDS, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"eos_token_id 50 \(argument\)"):
        model.generate_stream(IDS, max_new_tokens=2, eos_token_id=50)
    with pytest.raises(ValueError, match=r"token id 60 at position \(0, 1\)"):
        model.generate_stream(np.array([[4, 60]]), max_new_tokens=2)
    stream = model.generate_stream(IDS, max_new_tokens=3)
    np.testing.assert_array_equal(np.stack(list(stream), 1), model.generate(IDS, max_new_tokens=3)[:, 4:])


def test_a_stream_closed_early_leaves_later_calls_unchanged(model):
    """(A check, no defect found: the step state a stream donates to each step is its own.)"""
    kw = dict(max_new_tokens=3)  # the programs of the test above: nothing compiles again
    want = model.generate(IDS, **kw)
    stream = model.generate_stream(IDS, **kw)
    np.testing.assert_array_equal(next(stream), want[:, 4])
    stream.close()
    np.testing.assert_array_equal(model.generate(IDS, **kw), want)
    np.testing.assert_array_equal(np.stack(list(model.generate_stream(IDS, **kw)), 1), want[:, 4:])


def test_per_row_seeds_as_a_jax_array(model):
    """Before: seed=jnp.array([7, 8]) was refused ("seed must be an int or a list of 2 ints") though a 0-d jax
    array and a numpy array were accepted."""
    kw = dict(max_new_tokens=3, do_sample=True)
    np.testing.assert_array_equal(model.generate(IDS, seed=jnp.array([7, 8]), **kw),
                                  model.generate(IDS, seed=[7, 8], **kw))


def test_ragged_prompt_list_is_named(model):
    """Before: numpy's "setting an array element with a sequence ... inhomogeneous shape", naming no argument."""
    for fn in (model.generate, model.generate_stream):
        with pytest.raises(ValueError, match="input_ids must be .* different lengths"):
            fn([[4, 5, 6], [7, 8]], max_new_tokens=2)


def test_compiled_checks_host_labels():
    """Before: compiled(model) traced the labels, so the model could not range-check them: a label >= vocab_size
    or < -100 gave a NaN loss (the eager model raises, as transformers does). Numpy labels are now checked on the
    host, as eagerly, for each model class that takes labels."""
    config = _config(pad_token_id=0, id2label={0: "a", 1: "b", 2: "c"})
    lm = phi_jax.compiled(phi_jax.PhiForCausalLM(config, rngs=nnx.Rngs(0)))
    labels = IDS.copy()
    for bad in (50, -5):
        labels[1, 3] = bad
        with pytest.raises(ValueError, match=rf"labels {bad} at position \(1, 3\) is outside \[0, 50\)"):
            lm(IDS, labels=labels)
    labels[1, 3] = -100
    assert np.isfinite(float(lm(IDS, labels=labels).loss))
    tok = phi_jax.compiled(phi_jax.PhiForTokenClassification(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"labels 3 at position \(0, 1\)"):
        tok(IDS, labels=np.array([[1, 3, 0, -100], [0, 0, 0, 0]]))
    seq = phi_jax.compiled(phi_jax.PhiForSequenceClassification(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"labels 7 at position \(1,\)"):
        seq(IDS, labels=np.array([1, 7]))
    assert np.isfinite(float(seq(IDS, labels=np.array([1, 2])).loss))
