"""A config.json is an input: every field checked for type and range, and against the checkpoint's tensors before
any model is built; special-token ids never invented and never outside the vocabulary."""

from __future__ import annotations

import json
import os
import time

import pytest
import transformers

import phi_jax
from phi_jax import convert
from phi_jax.config import PhiConfig
from test_convert import _write_legacy


def _base() -> dict:
    return transformers.PhiConfig(vocab_size=96, hidden_size=64, num_attention_heads=4).to_dict()


@pytest.mark.parametrize("change, culprit", [
    (dict(num_hidden_layers="2"), "num_hidden_layers='2'"),
    (dict(num_attention_heads=0), "num_attention_heads=0"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0"),
    (dict(hidden_size=-64), "hidden_size=-64"),
    (dict(vocab_size=96.0), "vocab_size=96.0"),
    (dict(intermediate_size=None), "intermediate_size=None"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0"),
    (dict(num_hidden_layers=True), "num_hidden_layers=True"),
    (dict(layer_norm_eps=0), "layer_norm_eps=0"),
    (dict(layer_norm_eps=float("inf")), "layer_norm_eps=inf"),
    (dict(initializer_range="0.02"), "initializer_range='0.02'"),
    (dict(resid_pdrop=1.0), "resid_pdrop=1.0"),
    (dict(attention_dropout=-0.1), "attention_dropout=-0.1"),
    (dict(use_cache="yes"), "use_cache='yes'"),
    (dict(qk_layernorm=1), "qk_layernorm=1"),
    (dict(hidden_act=3), "hidden_act=3"),
    (dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=-0.5)), "partial_rotary_factor.*-0.5"),
    (dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=1.5)), "partial_rotary_factor.*1.5"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=-1.0)), "rope_theta.*-1.0"),
    (dict(rope_parameters=dict(rope_type="linear", factor=0)), "factor.*0"),
    (dict(rope_parameters="default"), "rope_parameters='default'"),
    (dict(rope_parameters=dict(rope_type=["default"])), r"\['default'\]"),
    (dict(bos_token_id=96), "bos_token_id=96"),
    (dict(pad_token_id=-1), "pad_token_id=-1"),
    (dict(eos_token_id=[2, 50256]), r"eos_token_id=\[2, 50256\]"),
    (dict(eos_token_id=[]), r"eos_token_id=\[\]"),
    (dict(eos_token_id="2"), "eos_token_id='2'"),
    (dict(num_labels="3"), "num_labels='3'"),
    (dict(id2label={"a": "x"}), "id2label"),
    (dict(architectures="PhiForCausalLM"), "architectures='PhiForCausalLM'"),
])
def test_bad_field_is_a_value_error_naming_field_and_value(change, culprit, tmp_path):
    d = _base()
    d.update(change)
    if "rope_parameters" in change:
        d.pop("rope_scaling", None)
    with pytest.raises(ValueError, match=culprit):
        PhiConfig.from_dict(d)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match=f"config.json: .*{culprit}"):  # read from a file: the file is named
        PhiConfig.from_pretrained(tmp_path)


def test_good_special_ids_and_eos_lists_pass():
    c = PhiConfig.from_dict({**_base(), "eos_token_id": [2, 95], "bos_token_id": 0, "pad_token_id": None})
    assert c.eos_token_id == [2, 95] and c.bos_token_id == 0 and c.pad_token_id is None


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=10 ** 9), r"num_hidden_layers=1000000000 does not fit the checkpoint: it holds 1 layer"),
    (dict(vocab_size=50), r"vocab_size=50 does not fit .*embed_tokens.weight in .*model.safetensors has shape "
                          r"\[96, 64\] \(96 tokens\)"),
    (dict(hidden_size=128, num_attention_heads=8), r"hidden_size=128 does not fit .*hidden size 64"),
    (dict(intermediate_size=512), r"intermediate_size=512 does not fit .*mlp.fc1.weight .* \[256, 64\]"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2 does not fit .*need 32 rows .* \[64, 64\]"),
    (dict(num_attention_heads=2, num_key_value_heads=2), r"num_attention_heads=2 does not fit .*"
                                                         r"q_layernorm.weight .*\[16\] \(head_dim 16: 4 heads\)"),
    (dict(qk_layernorm=False), r"qk_layernorm=False does not fit .*holds q_layernorm"),
])
def test_config_checked_against_the_tensors_before_building(make_checkpoint, change, message, tmp_path):
    src, _ = make_checkpoint("phi1", num_hidden_layers=1, qk_layernorm=True)
    with open(os.path.join(src, "config.json")) as f:
        d = json.load(f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**d, **change}, f)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        phi_jax.PhiForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match=message):
        convert.hf_to_orbax(src, tmp_path / "out")
    assert time.perf_counter() - start < 10 and not os.path.exists(tmp_path / "out")


def test_microsoft_checkpoint_without_special_ids_invents_none(make_checkpoint, tmp_path):
    """A Microsoft-layout checkpoint with a 1000-token vocabulary and no special ids in its config keeps none
    (50256 once stood in for them and lay outside the vocabulary)."""
    _, ref = make_checkpoint("phi2", vocab_size=1000)
    src = _write_legacy(tmp_path / "legacy", ref, "phi-msft", "safetensors")
    model = phi_jax.PhiForCausalLM.from_pretrained(src)
    c = model.config
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (None, None, None)
    convert.legacy_to_hf(src, tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        written = json.load(f)
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (None, None, None)
    assert phi_jax.PhiForCausalLM.from_pretrained(tmp_path / "hf").config.eos_token_id is None
    # ids the Microsoft config does carry are checked against its vocabulary
    with open(os.path.join(src, "config.json")) as f:
        d = json.load(f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**d, "eos_token_id": 50256}, f)
    with pytest.raises(ValueError, match=r"config.json: eos_token_id=50256 must be a token id in \[0, "
                                         r"vocab_size=1000\)"):
        convert.legacy_to_hf(src, tmp_path / "hf2")
