"""Samplers on logits whose distribution the test sets, alone and through `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phi_jax
from phi_jax.generation.sampling import Greedy, Sampling, make_sampler

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # token i has probability PROBS[i]


def _frequencies(sampler, probs=PROBS, rows=20000, seed=0):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (rows, len(probs)))
    tokens = np.asarray(jax.jit(sampler.next_tokens)(logits, jax.random.key(seed)))
    return np.bincount(tokens, minlength=len(probs)) / rows


def _expected(keep, temperature=1.0):
    p = np.where(keep, PROBS ** (1 / temperature), 0.0)
    return p / p.sum()


@pytest.mark.parametrize("sampler,keep,temperature", [
    (Sampling(), [1, 1, 1, 1, 1, 1], 1.0),
    (Sampling(temperature=2.0), [1, 1, 1, 1, 1, 1], 2.0),
    (Sampling(top_k=3), [1, 1, 1, 0, 0, 0], 1.0),
    # nucleus 0.7: tokens ranked above 0 / 1 / 2 hold 0 / 0.4 / 0.65 < 0.7; above 3 hold 0.8
    (Sampling(top_p=0.7), [1, 1, 1, 0, 0, 0], 1.0),
    (Sampling(top_p=0.6), [1, 1, 0, 0, 0, 0], 1.0),  # (0.65 is the boundary itself: rounding decides, as in torch)
    (Sampling(top_k=2, top_p=0.9), [1, 1, 0, 0, 0, 0], 1.0),
    (Sampling(top_p=0.3), [1, 0, 0, 0, 0, 0], 1.0),
    # temperature first: at T=0.5 probabilities ~ p^2 -> [.615, .240, .087, .038, ...]; above token 2: .855
    (Sampling(temperature=0.5, top_p=0.8), [1, 1, 0, 0, 0, 0], 0.5),
    (Sampling(temperature=0.5, top_p=0.9), [1, 1, 1, 0, 0, 0], 0.5),
])
def test_frequencies(sampler, keep, temperature):
    freq = _frequencies(sampler)
    want = _expected(np.asarray(keep, bool), temperature)
    assert (freq[~np.asarray(keep, bool)] == 0).all(), freq
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_same_key_same_tokens_and_greedy():
    s = Sampling(temperature=1.5, top_k=4, top_p=0.9)
    logits = jax.random.normal(jax.random.key(1), (64, 50))
    a, b = s.next_tokens(logits, jax.random.key(7)), s.next_tokens(logits, jax.random.key(7))
    c = s.next_tokens(logits, jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(Sampling(top_k=1).next_tokens(logits, jax.random.key(3)),
                                  Greedy().next_tokens(logits))


def test_make_sampler_checks():
    assert make_sampler() == Greedy()
    for kw, match in [(dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                      (dict(top_p=1.5), "top_p"), (dict(top_k=2.5), "top_k")]:
        with pytest.raises(ValueError, match=match):
            make_sampler(True, **kw)
    # transformers' "off" values: top_k=0 filters nothing; greedy takes top_k=0 and top_p=1.0 as unset
    assert make_sampler(True, top_k=0, top_p=0.9) == make_sampler(True, top_p=0.9)
    assert make_sampler(False, top_k=0, top_p=1.0) == Greedy()
    with pytest.raises(ValueError, match="only with do_sample=True"):
        make_sampler(False, top_k=5)


def _controlled_model(probs):
    """A tiny PhiForCausalLM whose next-token distribution is `probs` whatever the input (lm_head = bias)."""
    config = phi_jax.PhiConfig(vocab_size=len(probs), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, eos_token_id=None)
    model = phi_jax.PhiForCausalLM(config, rngs=nnx.Rngs(0))
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
    model.lm_head.bias[...] = jnp.log(jnp.asarray(probs, jnp.float32))
    return model


def test_generate_sampling_on_controlled_model():
    probs = np.concatenate([PROBS, np.full(10, 0.0)]) + 1e-3  # 16 tokens, 10 of them rare
    probs /= probs.sum()
    model = _controlled_model(probs)
    ids = np.zeros((8, 3), np.int32)
    kw = dict(max_new_tokens=48, do_sample=True)
    nucleus = model.generate(ids, top_p=0.6, seed=0, **kw)[:, 3:]
    assert set(np.unique(nucleus)) == {0, 1}  # above token 1: 0.40; above token 2: 0.65 >= 0.6
    free = model.generate(ids, seed=0, **kw)[:, 3:]
    assert np.unique(free).size >= 5  # without the nucleus the others do appear
    np.testing.assert_array_equal(free, model.generate(ids, seed=0, **kw)[:, 3:])  # same seed, same tokens
    assert (free != model.generate(ids, seed=1, **kw)[:, 3:]).any()
    assert set(np.unique(model.generate(ids, top_k=3, temperature=0.7, seed=2, **kw)[:, 3:])) <= {0, 1, 2}


def test_top_k_1_is_greedy_on_a_checkpoint(make_checkpoint):
    d, _ = make_checkpoint("phi1")
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    ids = np.random.default_rng(0).integers(3, 96, (2, 7))
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    topk1 = model.generate(ids, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=1, temperature=0.6, seed=5)
    np.testing.assert_array_equal(greedy, topk1)
    sampled = model.generate(ids, max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=3.0, seed=5)
    assert (sampled != greedy).any()


def test_top_k_keeps_ties_with_the_kth_logit():
    """transformers' TopKLogitsWarper keeps every token whose logit equals the k-th largest (bf16 logits tie often):
    top_k=2 on [3, 1, 1, 1, 0] keeps four tokens, and top_k=1 on a tied maximum samples among the tied."""
    freq = _frequencies(Sampling(top_k=2), probs=np.exp([3.0, 1.0, 1.0, 1.0, 0.0]))
    assert (freq[1:4] > 0.05).all() and freq[4] == 0, freq
    tied = _frequencies(Sampling(top_k=1), probs=np.array([0.2, 0.4, 0.4]))
    np.testing.assert_allclose(tied, [0, 0.5, 0.5], atol=0.015)


def test_per_row_seeds_draw_each_row_as_if_alone():
    """`seed=[s0, s1, ...]`: row b's tokens are those of row b generated alone with `seed=s_b`, whatever its batch
    mates and its place in the batch (with top-k too); the stream draws the same; one int seed keeps one key for
    the batch; bad seeds are one-line errors naming what is wrong."""
    probs = np.concatenate([PROBS, np.full(10, 0.0)]) + 1e-3
    model = _controlled_model(probs / probs.sum())
    ids = np.zeros((3, 3), np.int32)
    for sampling in (dict(), dict(top_k=3, temperature=0.7)):
        kw = dict(max_new_tokens=12, do_sample=True, **sampling)
        batch = model.generate(ids, seed=[7, 8, 9], **kw)
        for b, seed in enumerate((7, 8, 9)):
            np.testing.assert_array_equal(batch[b], model.generate(ids[:1], seed=seed, **kw)[0], err_msg=sampling)
        np.testing.assert_array_equal(model.generate(ids, seed=[9, 7, 8], **kw), batch[[2, 0, 1]])
        assert len({tuple(r) for r in batch[:, 3:]}) == 3  # three keys, three draws
    shared = model.generate(ids, seed=7, **kw)
    assert (shared[1:] != shared[0]).any()  # one key for the batch: rows still differ, as before
    stream = np.stack(list(model.generate_stream(ids, seed=np.array([7, 8, 9]), **kw)), axis=1)
    np.testing.assert_array_equal(stream, batch[:, 3:])
    with pytest.raises(ValueError, match=r"per-row seeds need one per row: \(3,\)"):
        model.generate(ids, seed=[1, 2], max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match=r"seed\[1\] = -1 is outside"):
        model.generate(ids, seed=[1, -1, 2], max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="seed must be an int or a list"):
        model.generate(ids, seed=1.5, max_new_tokens=2, do_sample=True)
