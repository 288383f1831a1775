"""Failures found by the fuzz suite (tests/test_fuzz.py) and by issue 9, shrunk and kept as regular tests.

Tests marked `xfail(strict=True)` name a fix that belongs to another part of the code and had not landed when the
failure was found; once it lands they pass, strict xfail turns that into a failure, and the marker must go.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import phi_jax
from conftest import rel_err
from test_fuzz import (TOL, check_forward, check_generate, corrupt_config, corrupt_file, load_or_clear_error,
                       time_limit)


def _small_vocab_model(tmp_path, **overrides):
    """A 1000-id vocabulary, as the Microsoft-layout checkpoint of issue 9."""
    from conftest import randomize, write_checkpoint
    kw = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kw.update(overrides)
    torch.manual_seed(0)
    ref = transformers.PhiForCausalLM(transformers.PhiConfig(**kw)).eval()
    randomize(ref, 0)
    return write_checkpoint(tmp_path / "small_vocab", ref), ref


def test_issue9_pad_id_past_the_vocabulary_at_masked_positions(tmp_path):
    """issue 9: generate left-padded prompts with eos 50256 on a 1000-id vocabulary; the NaN embedding of the
    out-of-range pad spread from the masked positions into every real one (every argmax 0)."""
    d, ref = _small_vocab_model(tmp_path)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    mask = np.ones((2, 16), bool)
    mask[0, :11] = False  # 11 pads, as generate's bucket padding
    ids = np.random.default_rng(0).integers(0, 1000, (2, 16))
    with torch.no_grad():
        expected = ref(torch.from_numpy(np.where(mask, ids, 0)), attention_mask=torch.from_numpy(mask * 1)).logits
    for call in (model, phi_jax.compiled(model)):
        logits = np.asarray(call(jnp.asarray(np.where(mask, ids, 50256)), jnp.asarray(mask)).logits)
        assert np.isfinite(logits[mask]).all()
        assert rel_err(logits[mask], expected.numpy()[mask]) <= TOL


def test_issue9_small_vocab_without_special_ids_generates_as_transformers(tmp_path):
    """A converted Microsoft config that carries no special ids: greedy tokens of left-padded prompts (padded to
    the bucket with the default pad) equal transformers'."""
    d, ref = _small_vocab_model(tmp_path)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    mask = np.ones((2, 7), bool)
    mask[1, :4] = False
    prompt = np.where(mask, np.random.default_rng(1).integers(0, 1000, (2, 7)), 0)
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None,
                                        bos_token_id=None)
    with torch.no_grad():
        expected = ref.generate(torch.from_numpy(prompt), attention_mask=torch.from_numpy(mask * 1),
                                generation_config=gen).numpy()
    out = model.generate(jnp.asarray(prompt), jnp.asarray(mask), max_new_tokens=6)
    np.testing.assert_array_equal(out, expected)
    assert len(set(out[:, 7:].ravel().tolist())) > 1  # not one token at every step


# ---- hand-written edge cases the strategies reach only rarely (not fuzz finds) --------------------------------------

def _case(**kw):
    base = dict(vocab_size=50257, hidden_size=80, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, hidden_act="gelu_new", max_position_embeddings=4, layer_norm_eps=1e-5,
                tie_word_embeddings=True, qk_layernorm=False, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, layout="5.x", seed=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.4))
    base.update(kw)
    return base


def test_fuzz_big_vocab_fully_padded_row_forward():
    """A 50257-id vocabulary, head_dim 80, a fully padded row beside a one-token row with junk past the vocabulary
    at the masked positions."""
    kw = _case()
    mask = np.array([[False, False, False], [False, False, True]])
    ids = np.array([[50256, 60000, -3], [50300, 7, 50256]])
    ids_ref = np.where(mask | (ids >= 0) & (ids < kw["vocab_size"]), ids, 0)  # in-range ids read as they are
    labels = np.where(mask, ids, -100)
    check_forward(kw, dict(ids=ids, ids_ref=ids_ref, mask=mask, labels=labels, position_ids=None,
                           other_junk=np.full((2, 3), 99999)))


def test_fuzz_one_token_prompts_generate():
    kw = _case(vocab_size=40, hidden_size=32, num_attention_heads=2, eos_token_id=[3, 5], pad_token_id=1,
               rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0, partial_rotary_factor=0.5))
    mask = np.array([[False, True], [True, True]])
    ids = np.array([[0, 9], [4, 17]])
    check_generate(kw, dict(ids=ids, ids_ref=ids, mask=mask), max_new_tokens=6, explicit=False)


# ---- corrupted config.json (found by the fuzz suite, fixed by io's validation) -----------------------------------

def _expect_named_error(directory, *names):
    with time_limit(20, "from_pretrained"):
        with pytest.raises(ValueError) as info:
            phi_jax.PhiForCausalLM.from_pretrained(directory)
    for name in names:
        assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("path, mutation, names", [
    (("num_attention_heads",), ("set", 0), ["num_attention_heads"]),  # ZeroDivisionError
    (("num_hidden_layers",), ("set", "2"), ["num_hidden_layers"]),  # TypeError naming no field
    (("num_hidden_layers",), ("set", 10 ** 9), ["num_hidden_layers", "1"]),  # builds layers for minutes
    (("intermediate_size",), ("delete", None), ["intermediate_size", "24"]),  # default 8192 vs the checkpoint's 24
    (("hidden_size",), ("set", None), ["hidden_size"]),  # TypeError
    (("hidden_size",), ("set", 0), ["hidden_size"]),  # ZeroDivisionError
    (("intermediate_size",), ("set", -1), ["intermediate_size"]),  # TypeError from a shape
    (("intermediate_size",), ("set", 1.5), ["intermediate_size"]),  # TypeError from a shape
    (("architectures",), ("set", 0), ["architectures"]),  # TypeError: 'int' object is not iterable
    (("attention_dropout",), ("set", [3]), ["attention_dropout"]),  # "Non-hashable static arguments"
    (("layer_norm_eps",), ("set", "1e-05"), ["layer_norm_eps"]),  # TypeError inside the traced forward
])
def test_corrupted_config_field_is_named(path, mutation, names):
    d, _ = corrupt_config("5.x", path, mutation)
    _expect_named_error(d, *names)


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
@pytest.mark.parametrize("key", ["rope_theta", "partial_rotary_factor"])
def test_null_rope_setting_is_named(layout, key):
    """Long-run find (chunk seed 5005): `"rope_theta": null` in a 4.x config loaded, then the first forward raised
    TypeError in `float(None)` (transformers: TypeError in its rotary init)."""
    path = (key,) if layout == "4.x" else ("rope_parameters", key)
    d, _ = corrupt_config(layout, path, ("set", None))
    _expect_named_error(d, key)


def test_huge_layer_norm_eps_is_named_or_works():
    """Long-run find (chunk seed 9005 and 20001): `layer_norm_eps: 2147483648` loads, then the first forward
    raises OverflowError ("An overflow was encountered while parsing an argument to a jitted computation")."""
    d, _ = corrupt_config("5.x", ("layer_norm_eps",), ("set", 2 ** 31))
    load_or_clear_error(d, ["layer_norm_eps"])


# ---- corrupted safetensors headers (found by the fuzz suite, fixed by io) ----------------------------------------

@pytest.mark.parametrize("kind, n", [("not_json", 1), ("shape", 5)])  # a JSON list header; shape "ab": TypeError
def test_corrupted_safetensors_header_is_named(kind, n):
    d, _ = corrupt_file(kind, n, 0.5)
    _expect_named_error(d, "model.safetensors")


def test_stray_tensor_is_named():
    """Fuzz find: model.safetensors of a 1-layer model plus `model.layers.9.mlp.fc9.weight`. The error says
    "config num_hidden_layers=1 does not fit the checkpoint: it holds 10 layers (layers.0 to layers.9)", but the
    checkpoint holds layers 0 and 9 only; the culprit is the stray tensor."""
    d, _ = corrupt_file("extra_tensor", 0, 0.0)
    _expect_named_error(d, "model.layers.9.mlp.fc9.weight")


# ---- special ids (fixed by helpers gen and io) ------------------------------------------------------------------------

def test_issue9_eos_past_the_vocabulary_is_named(tmp_path):
    """issue 9's checkpoint: eos 50256 (invented by the legacy conversion) on a 1000-id vocabulary is an error
    naming the field and the value, at load or at generate, never a silent wrong generation."""
    d, _ = _small_vocab_model(tmp_path, eos_token_id=50256)
    with pytest.raises(ValueError, match="eos_token_id.*50256|50256.*eos_token_id"):
        model = phi_jax.PhiForCausalLM.from_pretrained(d)
        model.generate(jnp.asarray([[5, 6, 7]]), max_new_tokens=2)


def test_pad_past_the_vocabulary_is_named_at_generate(tmp_path):
    d, _ = _small_vocab_model(tmp_path)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match="pad_token_id.*1000|1000.*pad_token_id"):
        model.generate(jnp.asarray([[5, 6, 7]]), max_new_tokens=2, pad_token_id=1000)
    config = json.loads(open(os.path.join(d, "config.json")).read())
    assert config.get("pad_token_id") is None


def test_generate_accepts_any_id_at_masked_prompt_positions(tmp_path):
    """Whatever sits at a masked prompt position (here an id past the vocabulary) changes no generated token;
    an out-of-range id at a real position is still an error naming it."""
    d, _ = _small_vocab_model(tmp_path)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    mask = jnp.asarray([[0, 0, 1, 1, 1]])
    clean = model.generate(jnp.asarray([[0, 0, 5, 6, 7]]), attention_mask=mask, max_new_tokens=3)
    junk = model.generate(jnp.asarray([[123456, 999, 5, 6, 7]]), attention_mask=mask, max_new_tokens=3)
    np.testing.assert_array_equal(np.asarray(clean)[:, 2:], np.asarray(junk)[:, 2:])
    with pytest.raises(ValueError, match="1000"):
        model.generate(jnp.asarray([[0, 0, 5, 1000, 7]]), attention_mask=mask, max_new_tokens=3)


def test_microsoft_config_written_in_full_loads(make_checkpoint, tmp_path):
    """Found by benchmarks/original_model.py: Microsoft's own config classes (`PhiConfig` of phi-2,
    `MixFormerSequentialConfig`) inherit PretrainedConfig, so a config.json they write in full (`to_dict()`, as
    `to_json_file(use_diff=False)` does) carries its generic keys (`id2label`, `output_attentions`,
    `chunk_size_feed_forward`, ...). The legacy reader refused them as unknown while the transformers reader
    ignores them. A key the original code has no setting for (`rope_theta`) is still refused by name."""
    from phi_jax import convert
    from test_convert import _legacy_config, _write_legacy
    _, ref = make_checkpoint("phi2", vocab_size=1000)
    src = _write_legacy(tmp_path / "legacy", ref, "phi-msft", "safetensors")
    plain = phi_jax.PhiForCausalLM.from_pretrained(src)
    generic = {"chunk_size_feed_forward": 0, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
               "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "is_encoder_decoder": False, "output_attentions": False,
               "output_hidden_states": False, "problem_type": None, "return_dict": True, "dtype": "float32"}
    d = _legacy_config(ref, "phi-msft")
    cfg = os.path.join(src, "config.json")
    with open(cfg, "w") as f:
        json.dump({**d, **generic}, f)
    full = phi_jax.PhiForCausalLM.from_pretrained(src)
    assert full.config == plain.config
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 9)))
    np.testing.assert_array_equal(np.asarray(full(ids).logits), np.asarray(plain(ids).logits))
    convert.legacy_to_hf(src, tmp_path / "hf")
    assert phi_jax.PhiForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == 1000
    with open(cfg, "w") as f:
        json.dump({**d, "rope_theta": 500.0}, f)
    with pytest.raises(ValueError, match="rope_theta"):
        phi_jax.PhiForCausalLM.from_pretrained(src)


@pytest.mark.parametrize("scaling, names", [
    ({"a": 1}, ["rope_scaling", "'a'"]),  # long-run find (chunk seed 5021): the error named only rope_parameters
    ({"type": "dynamic"}, ["rope_scaling", "factor"]),  # a rope type without its factor
    ({"type": "linear", "factor": "2"}, ["rope_scaling", "factor"]),
])
def test_4x_rope_scaling_errors_name_rope_scaling(scaling, names):
    d, _ = corrupt_config("4.x", ("rope_scaling",), ("set", scaling))
    _expect_named_error(d, *names)


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_dynamic_rope_with_two_rotary_channels_is_named(layout):
    """Long-run find (chunk seed 5031): dynamic NTK rope with int(16 * 0.125) = 2 rotary channels divided by zero
    (`dim / (dim - 2)`) at the first forward, in phi_jax and in transformers' own init."""
    rope = {"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.125}
    if layout == "4.x":
        d, _ = corrupt_config("4.x", ("rope_scaling",), ("set", {"type": "dynamic", "factor": 1.0}))
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["hidden_size"] // cfg["num_attention_heads"] == 16
        cfg["partial_rotary_factor"] = 0.125
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
    else:
        d, _ = corrupt_config("5.x", ("rope_parameters",), ("set", rope))
    _expect_named_error(d, "dynamic", "partial_rotary_factor")


@pytest.mark.parametrize("tied", [False, True])
def test_pad_id_row_gets_no_gradient_from_the_lookup(tmp_path, tied):
    """Gradient fuzzing: transformers builds the embedding with `padding_idx=pad_token_id`, so a real position
    holding the pad id (pad = eos is common in fine-tuning) adds nothing to that row's gradient; phi_jax's did.
    With tied embeddings the lm_head still trains the row, on both sides."""
    import jax

    from phi_jax.io.names import hf_key
    from phi_jax.train.step import grads_and_loss, split_model
    d, ref = _small_vocab_model(tmp_path, pad_token_id=7, tie_word_embeddings=tied)
    ids = np.array([[3, 7, 7, 12, 7, 40], [7, 9, 7, 7, 2, 5]], np.int32)  # the pad id at real positions
    ref.zero_grad()
    out = ref(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long())
    out.loss.backward()
    want = ref.model.embed_tokens.weight.grad.numpy()
    assert (want[7] == 0).all() != tied

    split = split_model(phi_jax.PhiForCausalLM.from_pretrained(d))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
             "position_ids": np.broadcast_to(np.arange(6, dtype=np.int32), ids.shape)}
    grads, loss, _ = jax.jit(lambda p: grads_and_loss(split, p, {}, batch, None))(split.trainable)
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * out.loss.item()
    got = np.asarray(grads["model.embed_tokens.embedding"])
    assert hf_key(("model", "embed_tokens", "embedding"))[0] == "model.embed_tokens.weight"
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got[7], want[7]) <= 1e-4 if tied else (got[7] == 0).all()
