"""compiled(model) and generate reuse one split of the model across calls, yet see every change to it.

The split is cached (phi_jax.compilation.SplitCache); these tests change the model in each way a user
can (a Variable's value, nnx.update, a replaced Variable or submodule, train()/eval()) and check that the
next call computes with the change, against the model run eagerly, and that nothing is split or compiled
again when nothing changed.
"""

from __future__ import annotations

import gc
import weakref

import optax

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


@pytest.mark.filterwarnings("ignore:'.value' setter is now deprecated:DeprecationWarning",
                            "ignore:'.value' access is now deprecated:DeprecationWarning")
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


def _same_as_a_fresh_split(cache, model):
    """The cached split's static half equals a fresh `nnx.split`'s, and its leaves are the model's arrays."""
    static, leaves = cache.split(model)
    graphdef, state = nnx.split(model)
    assert static == compilation.StaticGraph(graphdef, jax.tree.structure(state))
    fresh = jax.tree.leaves(state)
    assert len(leaves) == len(fresh) and all(a is b for a, b in zip(leaves, fresh))
    return static


def test_compiled_sees_metadata_list_items_and_attributes():
    """Changes that keep every attribute's identity but one deep in the graph, or that change no array."""
    model = _model()
    fwd = phi_jax.compiled(model)
    fwd(IDS)
    model.lm_head.bias.set_metadata(on_get_value=lambda var, value: value + 5.0)  # in-place metadata (a hook)
    _close(fwd(IDS).logits, model(IDS).logits)
    model.lm_head.bias.del_metadata("on_get_value")
    _close(fwd(IDS).logits, model(IDS).logits)
    layers = model.model.layers
    layers[1] = layers[0]  # an nnx.List item replaced: layer 0 is now shared
    _close(fwd(IDS).logits, model(IDS).logits)
    layers.append(_model().model.layers[0])  # an item added
    _close(fwd(IDS).logits, model(IDS).logits)
    assert len(model.model.layers) == 3

    cache = SplitCache()
    static = _same_as_a_fresh_split(cache, model)
    model.extra = nnx.Linear(4, 4, rngs=nnx.Rngs(0))  # a submodule added (its arrays join the state) ...
    assert _same_as_a_fresh_split(cache, model) != static
    del model.extra  # ... and removed
    assert _same_as_a_fresh_split(cache, model) == static
    attn = model.model.layers[0].self_attn
    assert attn.attn_dropout is None and attn.q_layernorm is None
    del attn.attn_dropout  # an attribute renamed, its value (None) kept: same objects, another graph
    attn.renamed = None
    assert _same_as_a_fresh_split(cache, model) != static


def test_compiled_sees_optimizer_updates():
    """Training steps through nnx.Optimizer under nnx.jit, and optax over nnx.state + nnx.update."""
    model = _model()
    fwd = phi_jax.compiled(model)
    before = np.asarray(fwd(IDS).logits)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(IDS, labels=IDS).loss)(model)
        optimizer.update(model, grads)
        return loss

    train_step(model, optimizer)
    after = np.asarray(fwd(IDS).logits)
    assert np.abs(after - before).max() > 1e-3
    _close(after, model(IDS).logits)
    params = nnx.state(model, nnx.Param)
    tx = optax.sgd(0.5)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    nnx.update(model, optax.apply_updates(params, updates))
    _close(fwd(IDS).logits, model(IDS).logits)


class _Blocks(nnx.Module):
    """Children in a plain list and a plain dict, and an optional Variable holding a pytree."""

    def __init__(self, pytree_param: bool = False):
        self.blocks = nnx.data([nnx.Linear(3, 3, rngs=nnx.Rngs(i)) for i in range(2)])
        self.named = nnx.data({"a": nnx.Linear(3, 3, rngs=nnx.Rngs(2))})
        if pytree_param:
            self.pair = nnx.Param({"w": jnp.ones((3,)), "b": jnp.zeros((3,))})

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        x = self.named["a"](x)
        if hasattr(self, "pair"):
            x = x * self.pair["w"] + self.pair["b"]
        return x


def _run(cache, module, x):
    static, leaves = cache.split(module)
    return jax.jit(lambda leaves: static.merge(leaves)(x))(leaves)


def test_plain_list_and_dict_nodes():
    module, x = _Blocks(), jnp.arange(6.0).reshape(2, 3)
    cache = SplitCache()
    _close(_run(cache, module, x), module(x))
    module.blocks[0] = nnx.Linear(3, 3, rngs=nnx.Rngs(7))  # an item of a plain list, replaced in place
    _close(_run(cache, module, x), module(x))
    module.named["a"] = module.blocks[1]  # a value of a plain dict, replaced in place
    _close(_run(cache, module, x), module(x))
    module.blocks.append(nnx.Linear(3, 3, rngs=nnx.Rngs(8)))
    _close(_run(cache, module, x), module(x))
    _same_as_a_fresh_split(cache, module)
    assert cache.cacheable


def test_a_variable_holding_a_pytree_is_split_every_call():
    module, x = _Blocks(pytree_param=True), jnp.arange(6.0).reshape(2, 3)
    cache = SplitCache()
    _close(_run(cache, module, x), module(x))
    assert not cache.cacheable
    module.pair.set_value({"w": jnp.full((3,), 2.0), "b": jnp.ones((3,))})
    _close(_run(cache, module, x), module(x))
    module.blocks[0].kernel[...] = jnp.eye(3)
    _close(_run(cache, module, x), module(x))


def test_a_graph_that_holds_its_root_is_seen_and_not_kept_alive():
    model = _model()
    model.model.owner = model  # a cycle back to the root
    out = model.generate(np.asarray(IDS), max_new_tokens=2)
    model.lm_head.bias[23] = 1e4
    assert (model.generate(np.asarray(IDS), max_new_tokens=2)[:, 7:] == 23).all()
    assert not (out[:, 7:] == 23).all()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
