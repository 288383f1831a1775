"""compiled(model) and generate reuse one split of the model across calls, yet see every change to it.

The split is cached (phi_jax.compilation.SplitCache); these tests change the model in each way a user
can (a Variable's value, nnx.update, a replaced Variable or submodule, train()/eval()) and check that the
next call computes with the change, against the model run eagerly, and that nothing is split or compiled
again when nothing changed.
"""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phi_jax
from phi_jax import compilation
from phi_jax.compilation import SplitCache, count_compilations, split_cached


def _model(**overrides):
    config = phi_jax.phi_2(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           vocab_size=50, bos_token_id=None, eos_token_id=None, **overrides)
    return phi_jax.PhiForCausalLM(config, rngs=nnx.Rngs(0))


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)), jnp.int32)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")
def test_compiled_sees_every_kind_of_update():
    model = _model()
    fwd = phi_jax.compiled(model)
    _close(fwd(IDS).logits, model(IDS).logits)
    before = np.asarray(fwd(IDS).logits)
    bias = model.lm_head.bias
    bias.value = bias.value + 1.0  # a new array in the same Variable (the deprecated spelling)
    _close(fwd(IDS).logits, before + 1.0)
    bias.set_value(bias.get_value() + 1.0)
    _close(fwd(IDS).logits, before + 2.0)
    bias[...] = bias[...] + 1.0  # indexed assignment
    _close(fwd(IDS).logits, before + 3.0)
    state = nnx.state(model)
    state["lm_head"]["bias"].set_value(bias.get_value() - 3.0)
    nnx.update(model, state)
    _close(fwd(IDS).logits, before)
    model.lm_head.bias = nnx.Param(jnp.full_like(bias.get_value(), 3.0))  # a replaced Variable
    _close(fwd(IDS).logits, model(IDS).logits)
    model.model.layers[1].mlp.fc2 = nnx.Linear(64, 32, rngs=nnx.Rngs(5))  # a replaced submodule
    _close(fwd(IDS).logits, model(IDS).logits)
    # a user's own jit over nnx.split state keeps working beside it
    graphdef, state = nnx.split(model)
    own = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    _close(own(state, IDS), fwd(IDS).logits)


def test_compiled_sees_train_and_eval():
    model = _model(resid_pdrop=0.5, embd_pdrop=0.5)
    fwd = phi_jax.compiled(model)
    evaluated = np.asarray(fwd(IDS).logits)
    _close(evaluated, model(IDS).logits)
    model.train()
    trained = np.asarray(fwd(IDS).logits)
    assert np.abs(trained - evaluated).max() > 1e-2  # dropout ran
    model.eval()
    _close(fwd(IDS).logits, evaluated)
    with count_compilations() as again:  # each mode's program is reused when the mode comes back
        model.train()
        fwd(IDS).logits.block_until_ready()
        model.eval()
        fwd(IDS).logits.block_until_ready()
    assert again.count == 0


def test_split_only_when_the_graph_changes(monkeypatch):
    model = _model()
    calls = []
    real = nnx.split
    monkeypatch.setattr(compilation.nnx, "split", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = SplitCache()
    static, leaves = cache.split(model)
    assert len(calls) == 1 and len(leaves) == len(jax.tree.leaves(nnx.state(model)))
    model.lm_head.bias.set_value(model.lm_head.bias.get_value() + 1.0)
    static2, leaves2 = cache.split(model)
    assert len(calls) == 1 and static2 is static  # a new value is read, not split for
    new = model.lm_head.bias.get_value()
    assert any(a is new for a in leaves2) and not any(a is new for a in leaves)
    model.eval()  # sets attributes to the values they already have: may or may not split, must stay equal
    cache.split(model)
    model.train()
    static3, _ = cache.split(model)
    assert static3 != static
    model.eval()
    static4, _ = cache.split(model)
    assert static4 == static and hash(static4) == hash(static)  # equal graphs share compiled programs


def test_generate_sees_updates_and_keeps_no_model_alive():
    model = _model()
    ids = np.asarray(IDS)
    first = model.generate(ids, max_new_tokens=3)
    bias = model.lm_head.bias
    bias[17] = 1e4  # token 17 now wins every greedy step
    out = model.generate(ids, max_new_tokens=3)
    assert (out[:, 7:] == 17).all() and not (first[:, 7:] == 17).all()
    streamed = np.stack(list(model.generate_stream(ids, max_new_tokens=3)), axis=1)
    assert (streamed == 17).all()
    split_cached(model)
    ref = weakref.ref(model)
    del model, bias
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("layers", [2, 8])
def test_cached_split_equals_a_fresh_split(layers):
    model = phi_jax.PhiForCausalLM(phi_jax.phi_1(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                                                 num_attention_heads=2, vocab_size=50), rngs=nnx.Rngs(1))
    static, leaves = SplitCache().split(model)
    graphdef, state = nnx.split(model)
    assert static.graphdef == graphdef
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(state)))
    _close(static.merge(leaves)(IDS).logits, model(IDS).logits)
