"""The train step: gradient parity with transformers' PyTorch Phi, gradient accumulation, remat, the optimizer."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from phi_jax.io.names import hf_key
from phi_jax.modeling.model import PhiForCausalLM
from phi_jax.train.step import (TrainConfig, grads_and_loss, init_state, make_optimizer, make_train_step,
                                split_model)
from conftest import rel_err


def _batch(vocab, b=2, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    labels = ids.copy()
    labels[0, :4] = -100  # a prompt: not a target
    labels[1, -2:] = -100
    return {"input_ids": ids, "attention_mask": np.ones((b, t), np.int32),
            "position_ids": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), "labels": labels}


def _torch_loss_and_grads(tmodel, batch):
    """transformers' causal-LM loss on `batch` and its float32 gradient of every named parameter."""
    tmodel.zero_grad()
    out = tmodel(torch.tensor(batch["input_ids"], dtype=torch.long), labels=torch.tensor(batch["labels"]).long())
    out.loss.backward()
    return out.loss.item(), {k: p.grad.numpy() for k, p in tmodel.named_parameters()}


@pytest.mark.parametrize("geometry,overrides", [
    ("phi1", {}),
    ("phi1", dict(num_key_value_heads=2, qk_layernorm=True)),
    ("phi2", dict(tie_word_embeddings=True)),
])
def test_gradients_match_transformers(make_checkpoint, geometry, overrides):
    path, tmodel = make_checkpoint(geometry, **overrides)
    batch = _batch(tmodel.config.vocab_size)
    torch_loss, ref = _torch_loss_and_grads(tmodel, batch)

    split = split_model(PhiForCausalLM.from_pretrained(path))
    grads, loss, count = jax.jit(lambda p, b: grads_and_loss(split, p, {}, b, None))(split.trainable, batch)
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(float(loss) - torch_loss) <= 1e-5 * abs(torch_loss)
    assert len(grads) == len(ref)
    for path_str, g in grads.items():
        key, transpose = hf_key(tuple(path_str.split(".")))
        want = ref[key].T if transpose else ref[key]
        assert rel_err(g, want) <= 1e-4, path_str


def _kernel_calls(jaxpr, counts=None) -> collections.Counter:
    """How often each attention kernel appears in a jaxpr, sub-jaxprs included (the Mosaic GPU kernels are
    `mpmd_map`s, the Pallas TPU and interpreted ones `pallas_call`s named by their kernel)."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "mpmd_map":
            counts["mosaic_gpu"] += 1
        elif eqn.primitive.name == "pallas_call":
            counts[str(eqn.params.get("name", ""))] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _kernel_calls(sub, counts)
    return counts


def test_dots_and_attention_saveable_keeps_the_attention_forward(make_checkpoint):
    """phi_jax's remat policy `dots_and_attention_saveable` (phi_jax/modeling/remat.py) with our kernels: gradients
    equal transformers', and the backward runs no attention forward kernel again (JAX's own policies rerun it on
    every platform's branch: the Mosaic GPU kernel, the Pallas TPU kernel, the CPU's interpreted one)."""
    path, tmodel = make_checkpoint("phi1", num_key_value_heads=2)
    batch = _batch(tmodel.config.vocab_size)
    torch_loss, ref = _torch_loss_and_grads(tmodel, batch)
    split = split_model(PhiForCausalLM.from_pretrained(path, attn_implementation="pallas"),
                        remat_policy="dots_and_attention_saveable")
    grads, loss, _ = jax.jit(lambda p, b: grads_and_loss(split, p, {}, b, None))(split.trainable, batch)
    assert abs(float(loss) - torch_loss) <= 1e-5 * abs(torch_loss)
    for path_str, g in grads.items():
        key, transpose = hf_key(tuple(path_str.split(".")))
        assert rel_err(g, ref[key].T if transpose else ref[key]) <= 1e-4, path_str
    calls = {}
    for policy in (None, "dots_with_no_batch_dims_saveable", "dots_and_attention_saveable"):
        # bf16 compute: the CUDA branch runs the Mosaic GPU kernels (which take 16-bit inputs only)
        split = split_model(PhiForCausalLM.from_pretrained(path, attn_implementation="pallas", dtype=jnp.bfloat16,
                                                           param_dtype=jnp.float32), remat_policy=policy)
        fn = jax.jit(lambda p, b: grads_and_loss(split, p, {}, b, None))
        calls[policy] = _kernel_calls(jax.make_jaxpr(fn)(split.trainable, batch).jaxpr)
    fwd = [k for k in calls[None] if "fwd" in k] + ["mosaic_gpu"]
    assert calls[None]["mosaic_gpu"] > 0 and any(calls[None][k] for k in fwd if k != "mosaic_gpu")
    for k in fwd:  # saved: as often as without remat; JAX's policy: more often
        assert calls["dots_and_attention_saveable"][k] == calls[None][k], (k, calls)
        assert calls["dots_with_no_batch_dims_saveable"][k] > calls[None][k], (k, calls)
    with pytest.raises(ValueError, match="'dots_and_attention'"):
        split_model(PhiForCausalLM.from_pretrained(path), remat_policy="dots_and_attention")


def test_accumulation_and_remat_change_nothing(make_checkpoint):
    path, _ = make_checkpoint("phi1")
    batch = _batch(96, b=4, seed=1)
    base = split_model(PhiForCausalLM.from_pretrained(path))
    g1, l1, _ = jax.jit(lambda p, b: grads_and_loss(base, p, {}, b, None))(base.trainable, batch)
    remat = split_model(PhiForCausalLM.from_pretrained(path), remat_policy="nothing_saveable")
    g2, l2, _ = jax.jit(lambda p, b: grads_and_loss(remat, p, {}, b, None, accum_steps=2))(remat.trainable, batch)
    assert abs(float(l1) - float(l2)) <= 1e-6 * abs(float(l1))
    for k in g1:
        assert rel_err(g2[k], g1[k]) <= 1e-5, k


def test_step_is_adamw_with_clipping(make_checkpoint):
    """One step of ours equals optax's clip + AdamW applied by hand to our gradients; the loss goes down."""
    path, _ = make_checkpoint("phi1")
    batch = _batch(96)
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1, max_grad_norm=0.5)
    split = split_model(PhiForCausalLM.from_pretrained(path))
    tx = make_optimizer(cfg)
    state = init_state(split, tx)
    step = jax.jit(make_train_step(split, tx))
    new, metrics = step(state, {}, batch, None)
    grads_fn = jax.jit(lambda p: grads_and_loss(split, p, {}, batch, None))
    grads, loss, _ = grads_fn(split.trainable)
    norm = float(optax.tree.norm(grads))
    assert abs(float(metrics["grad_norm"]) - norm) <= 1e-5 * norm and norm > 0.5  # clipping is active
    scale = 0.5 / norm
    k = "model.layers.0.mlp.fc1.kernel"
    g = np.asarray(grads[k]) * scale
    w = np.asarray(split.trainable[k])
    # AdamW's first step: m/(sqrt(v)+eps) = g/(|g|+eps) with bias correction; lr at step 0 of cosine = peak
    want = w - 1e-2 * (g / (np.abs(g) + 1e-8) + 0.1 * w)
    # tiny gradients: sign-like steps
    np.testing.assert_allclose(np.asarray(new["params"][k]), want, rtol=1e-5, atol=2e-5)
    assert int(new["step"]) == 1
    _, loss2, _ = grads_fn(new["params"])
    assert float(loss2) < float(loss)


def test_bf16_compute_keeps_float32_masters(make_checkpoint):
    path, _ = make_checkpoint("phi1")
    batch = _batch(96, b=4)
    tx = make_optimizer(TrainConfig(learning_rate=1e-3))
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        split = split_model(PhiForCausalLM.from_pretrained(path, dtype=dtype, param_dtype=jnp.float32),
                            remat_policy="dots_with_no_batch_dims_saveable")
        state, metrics = jax.jit(make_train_step(split, tx, accum_steps=2))(init_state(split, tx), {}, batch, None)
        assert all(v.dtype == jnp.float32 for v in state["params"].values())
        losses[dtype] = float(metrics["loss"])
    assert abs(losses[jnp.bfloat16] - losses[jnp.float32]) <= 0.02 * losses[jnp.float32]


@pytest.mark.parametrize("geometry,overrides,remat", [
    ("phi1", {}, None),
    ("phi1", dict(num_key_value_heads=2, qk_layernorm=True), "dots_with_no_batch_dims_saveable"),
    ("phi2", dict(tie_word_embeddings=True), "nothing_saveable"),
])
def test_bf16_gradients_near_transformers(make_checkpoint, geometry, overrides, remat):
    """bf16 compute over float32 masters (bf16 x bf16 gradient products, phi_jax/modeling/matmul.py) against
    transformers' float32 gradients on the weights transformers wrote: the direction of the whole gradient and
    every tensor within bf16 error. Measured: worst tensor max|d|/std 0.083, 0.078, 0.159 for the three cases
    (JAX's own float32 gradient products: 0.083, 0.068, 0.159), cosine >= 0.99997, loss within 2.2e-4."""
    path, tmodel = make_checkpoint(geometry, **overrides)
    batch = _batch(tmodel.config.vocab_size)
    torch_loss, ref = _torch_loss_and_grads(tmodel, batch)

    split = split_model(PhiForCausalLM.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32),
                        remat_policy=remat)
    grads, loss, _ = jax.jit(lambda p, b: grads_and_loss(split, p, {}, b, None))(split.trainable, batch)
    assert abs(float(loss) - torch_loss) <= 1e-3 * abs(torch_loss)
    ours, want = [], []
    for path_str, g in grads.items():
        key, transpose = hf_key(tuple(path_str.split(".")))
        w = ref[key].T if transpose else ref[key]
        assert g.dtype == jnp.float32
        assert rel_err(g, w) <= 0.25, path_str
        ours.append(np.asarray(g).ravel())
        want.append(w.ravel())
    a, b = np.concatenate(ours), np.concatenate(want)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999


@pytest.mark.parametrize("pdrop", ["resid_pdrop", "embd_pdrop", "attention_dropout"])
def test_dropout_follows_the_step_key(pdrop):
    """Each dropout of the config is on in training and a function of the step key: the same key gives the same
    loss, another key another loss, and dropout off (`train=False`) a third."""
    from flax import nnx

    from phi_jax.config import PhiConfig
    from phi_jax.train.step import make_loss_fn, step_key
    cfg = PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    **{pdrop: 0.2})
    model = PhiForCausalLM(cfg, rngs=nnx.Rngs(0))
    batch = _batch(96, b=4)
    on, off = split_model(model), split_model(model, train=False)
    loss = jax.jit(lambda p, b, k: make_loss_fn(on)(p, {}, b, k)[0])
    l0, l0b, l1 = (float(loss(on.trainable, batch, step_key(0, s))) for s in (3, 3, 4))
    l_off = float(jax.jit(lambda p, b: make_loss_fn(off)(p, {}, b, None)[0])(off.trainable, batch))
    assert l0 == l0b
    assert min(abs(l0 - l1), abs(l0 - l_off), abs(l1 - l_off)) > 1e-3 * l_off, (l0, l1, l_off)
    with pytest.raises(ValueError, match="dropout is on .* but the step got no key"):
        loss(on.trainable, batch, None)  # the same masks every step otherwise


def test_accumulation_with_dropout_draws_other_masks():
    """With dropout each micro-batch takes a split of the step key: accum_steps=2 is reproducible but gives
    another loss than accum_steps=1 (the `grads_and_loss` docstring; without dropout they agree:
    test_accumulation_and_remat_change_nothing)."""
    from flax import nnx

    from phi_jax.config import PhiConfig
    from phi_jax.train.step import step_key
    cfg = PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    resid_pdrop=0.2)
    split = split_model(PhiForCausalLM(cfg, rngs=nnx.Rngs(0)))
    batch, key = _batch(96, b=4), step_key(0, 0)
    loss = {n: jax.jit(lambda p, b, k, n=n: grads_and_loss(split, p, {}, b, k, accum_steps=n)[1])
            for n in (1, 2)}
    l1, l2 = float(loss[1](split.trainable, batch, key)), float(loss[2](split.trainable, batch, key))
    assert l2 == float(loss[2](split.trainable, batch, key))
    assert abs(l1 - l2) > 1e-3, (l1, l2)
