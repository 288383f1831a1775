"""Logits parity with transformers' PyTorch Phi on checkpoints transformers wrote.

Tolerance (float32): max |logits - reference| / std(reference) <= 1e-4 at every real position.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import phi_jax
from conftest import rel_err

TOL = 1e-4

# name -> (make_checkpoint kwargs, sequence length)
CASES = {
    "phi1": (dict(geometry="phi1"), 24),
    "phi2": (dict(geometry="phi2"), 24),
    "gqa": (dict(geometry="phi1", num_key_value_heads=2), 24),
    "gqa_mqa_phi2": (dict(geometry="phi2", num_attention_heads=4, num_key_value_heads=1), 24),
    "qk_layernorm": (dict(geometry="phi1", qk_layernorm=True), 24),
    "qk_layernorm_gqa_phi2": (dict(geometry="phi2", qk_layernorm=True, num_key_value_heads=1), 24),
    "rope_linear": (dict(geometry="phi1", rope_parameters=dict(rope_type="linear", factor=2.0,
                                                                  partial_rotary_factor=0.5)), 24),
    "rope_theta": (dict(geometry="phi2", rope_parameters=dict(rope_type="default", rope_theta=500.0,
                                                                 partial_rotary_factor=0.4)), 24),
    "tied": (dict(geometry="phi1", tie_word_embeddings=True), 24),
    "layout_4x": (dict(geometry="phi1", layout="4.x"), 24),
    "layout_4x_linear": (dict(geometry="phi2", layout="4.x", rope_parameters=dict(
        rope_type="linear", factor=3.0, partial_rotary_factor=0.4)), 24),
    "sharded": (dict(geometry="phi2", fmt="sharded"), 24),
    "bin": (dict(geometry="phi1", fmt="bin"), 24),
    "gelu_exact": (dict(geometry="phi1", hidden_act="gelu"), 24),
    "layer_norm_eps": (dict(geometry="phi1", layer_norm_eps=1e-3), 24),
    "long_gqa": (dict(geometry="phi1", num_key_value_heads=2, max_position_embeddings=512), 300),  # blocked attention
}


def _ids(batch, seq, vocab, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, (batch, seq)))


def _torch_logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_causal_lm_float32(make_checkpoint, case):
    kw, seq = CASES[case]
    d, ref_model = make_checkpoint(**kw)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    ids = _ids(2, seq, ref_model.config.vocab_size)
    ref = _torch_logits(ref_model, ids)
    assert 0.5 < np.std(ref) < 20, "weights should give logits of a few units"
    out = model(jnp.asarray(ids.numpy())).logits
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL

    # Right padding: only real positions are compared.
    mask = np.ones((2, seq), np.int64)
    mask[1, seq - 7:] = 0
    ref = _torch_logits(ref_model, ids, attention_mask=torch.from_numpy(mask))
    out = np.asarray(model(jnp.asarray(ids.numpy()), jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    assert rel_err(out[real], ref[real]) <= TOL

    # Explicit, non-trivial position ids.
    pos = np.stack([np.arange(seq) + 5, np.arange(seq) * 2]).astype(np.int64)
    ref = _torch_logits(ref_model, ids, position_ids=torch.from_numpy(pos))
    out = model(jnp.asarray(ids.numpy()), position_ids=jnp.asarray(pos)).logits
    assert rel_err(out, ref) <= TOL


LONG_ROPES = {
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=8, beta_slow=2),
    "yarn_mscale": dict(rope_type="yarn", factor=3.0, mscale=0.8, mscale_all_dim=0.5),
    "yarn_attention_factor": dict(rope_type="yarn", factor=2.0, attention_factor=1.3, truncate=False),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
    "longrope": dict(rope_type="longrope", short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[1.2, 2.5, 4.0, 7.0],
                     original_max_position_embeddings=16, factor=4.0),
}


@pytest.mark.parametrize("rope", sorted(LONG_ROPES))
def test_long_context_ropes_match_fresh_transformers_model(make_checkpoint, rope):
    """Each rope type, below and past max_position_embeddings / original_max_position_embeddings, each call
    against a freshly loaded transformers model (transformers' dynamic and longrope keep state between calls)."""
    params = dict(LONG_ROPES[rope], partial_rotary_factor=0.5)
    d, _ = make_checkpoint(geometry="phi1", max_position_embeddings=16, rope_parameters=params)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    errs = {}
    for seq in (40, 12, 16, 17):
        fresh = transformers.PhiForCausalLM.from_pretrained(d).eval()
        ids = _ids(2, seq, 96, seed=seq)
        ref = _torch_logits(fresh, ids)
        errs[seq] = rel_err(model(jnp.asarray(ids.numpy())).logits, ref)
    assert max(errs.values()) <= TOL, errs
    # The rope type changes the result (the path is exercised).
    static = phi_jax.PhiForCausalLM.from_pretrained(d, config=model.config.replace(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)))
    ids = jnp.asarray(_ids(2, 40, 96, seed=40).numpy())
    assert rel_err(static(ids).logits, model(ids).logits) > 1e-3


def test_hidden_states_match(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi2", cls="PhiModel", num_hidden_layers=3)
    model = phi_jax.PhiModel.from_pretrained(d)
    ids = _ids(2, 16, 96)
    with torch.no_grad():
        ref = ref_model(ids, output_hidden_states=True)
    out = model(jnp.asarray(ids.numpy()), output_hidden_states=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(a, b.numpy()) <= TOL


def test_base_model_loads_from_causal_lm_checkpoint(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi1")
    model = phi_jax.PhiModel.from_pretrained(d)
    ids = _ids(1, 10, 96)
    with torch.no_grad():
        ref = ref_model.model(ids).last_hidden_state.numpy()
    assert rel_err(model(jnp.asarray(ids.numpy())).last_hidden_state, ref) <= TOL


def test_loss_matches(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi2")
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    ids = _ids(2, 20, 96)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 13] = -100
    with torch.no_grad():
        ref = ref_model(ids, labels=labels).loss.item()
    out = float(model(jnp.asarray(ids.numpy()), labels=jnp.asarray(labels.numpy())).loss)
    assert abs(out - ref) / abs(ref) <= 1e-5, (out, ref)


def test_sequence_classification_matches(make_checkpoint):
    pad = 0
    d, ref_model = make_checkpoint(geometry="phi1", cls="PhiForSequenceClassification", pad_token_id=pad,
                                   num_labels=3)
    model = phi_jax.PhiForSequenceClassification.from_pretrained(d)
    ids = _ids(3, 12, 95) + 1  # no pad inside
    ids[1, 8:] = pad  # right padding: pooled at position 7
    ids[2, 3:] = pad
    mask = (ids != pad).long()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, labels=labels)
    out = model(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), labels=jnp.asarray(labels.numpy()))
    assert out.logits.shape == (3, 3)
    assert rel_err(out.logits, ref.logits.numpy()) <= TOL
    assert abs(float(out.loss) - ref.loss.item()) / ref.loss.item() <= 1e-5


def test_sequence_classification_regression_loss(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi1", cls="PhiForSequenceClassification", pad_token_id=0,
                                   num_labels=1)
    model = phi_jax.PhiForSequenceClassification.from_pretrained(d)
    ids = _ids(2, 8, 95) + 1
    labels = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        ref = ref_model(ids, labels=labels)
    out = model(jnp.asarray(ids.numpy()), labels=jnp.asarray(labels.numpy()))
    assert abs(float(out.loss) - ref.loss.item()) / ref.loss.item() <= 1e-5


def test_token_classification_matches(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi2", cls="PhiForTokenClassification", num_labels=5)
    model = phi_jax.PhiForTokenClassification.from_pretrained(d)
    ids = _ids(2, 14, 96)
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 5, (2, 14)))
    labels[0, :3] = -100
    with torch.no_grad():
        ref = ref_model(ids, labels=labels)
    out = model(jnp.asarray(ids.numpy()), labels=jnp.asarray(labels.numpy()))
    assert rel_err(out.logits, ref.logits.numpy()) <= TOL
    assert abs(float(out.loss) - ref.loss.item()) / ref.loss.item() <= 1e-5


def test_bfloat16_top1_agreement(tmp_path):
    """bf16 compute against the float32 reference, beside transformers' own bf16 model on the same inputs: top-1
    agreement >= 98% and at most one position (of 512) below transformers' bf16; max error <= 0.03 std and no more
    than transformers' bf16 (measured 2026-11-27: phi_jax 98.6% / 0.021, transformers 98.8% / 0.025; phi_jax was
    99.6% / 0.015 while its projections kept float32 results, before `projection_result_type`).

    The checkpoint holds bf16-representable weights (released Phi weights are half precision), so this
    measures the compute precision rather than the rounding of the checkpoint.
    """
    from conftest import randomize, torch_config, write_checkpoint
    ref_model = transformers.PhiForCausalLM(torch_config("phi2", vocab_size=512)).eval()
    randomize(ref_model, 0)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(p.bfloat16().float())
    d = write_checkpoint(tmp_path / "bf16", ref_model)
    model = phi_jax.PhiForCausalLM.from_pretrained(d, dtype=jnp.bfloat16)
    assert model.model.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
    ids = _ids(8, 64, 512, seed=3)
    ref = _torch_logits(ref_model, ids)
    torch_bf16 = _torch_logits(ref_model.to(torch.bfloat16), ids)
    out = np.asarray(model(jnp.asarray(ids.numpy())).logits)
    agree, torch_agree = (np.mean(x.argmax(-1) == ref.argmax(-1)) for x in (out, torch_bf16))
    err, torch_err = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert agree >= 0.98 and agree >= torch_agree - 1 / out[..., 0].size - 1e-9, (agree, torch_agree)
    assert 1e-3 < err <= min(0.03, torch_err), (err, torch_err)  # above 1e-3: bf16 arithmetic really ran


def test_compiled_forward_compiles_once_per_shape(make_checkpoint):
    from phi_jax.compilation import count_compilations
    d, ref_model = make_checkpoint(geometry="phi1")
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    fwd = phi_jax.compiled(model)
    # shapes no other test uses, so that the first call really compiles
    ids = jnp.asarray(_ids(3, 19, 96).numpy())
    others = [jnp.asarray(_ids(3, 19, 96, seed).numpy()) for seed in (1, 2)]
    shorter = jnp.asarray(_ids(3, 11, 96).numpy())
    ref = _torch_logits(ref_model, _ids(3, 19, 96))
    with count_compilations() as first:
        out = fwd(ids).logits
    assert rel_err(out, ref) <= TOL
    assert first.count >= 1
    with count_compilations() as same_shape:  # same shape, new values: no new program
        for x in others:
            fwd(x).logits.block_until_ready()
    assert same_shape.count == 0
    with count_compilations() as new_shape:
        fwd(shorter).logits.block_until_ready()
    assert new_shape.count >= 1
    # weight updates are seen by the cached forward
    model.lm_head.bias[...] = model.lm_head.bias[...] + 1.0
    np.testing.assert_allclose(np.asarray(fwd(ids).logits), np.asarray(out) + 1.0, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi1", resid_pdrop=0.3, embd_pdrop=0.2, attention_dropout=0.2)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    ids = jnp.asarray(_ids(1, 12, 96).numpy())
    ref = _torch_logits(ref_model, torch.from_numpy(np.array(ids)))
    assert rel_err(model(ids).logits, ref) <= TOL  # eval mode by default
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert rel_err(a, ref) > 1e-2 and rel_err(a, b) > 1e-2
    model.eval()
    assert rel_err(model(ids).logits, ref) <= TOL
