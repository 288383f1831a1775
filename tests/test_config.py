"""PhiConfig: both config.json layouts, round trip through transformers, clear errors, presets."""

from __future__ import annotations

import json

import jax
import pytest
import torch
import transformers
from flax import nnx

import phi_jax
from phi_jax.config import PhiConfig


def test_layouts_agree(make_checkpoint):
    rope = dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.4, rope_theta=2000.0)
    d5, _ = make_checkpoint(geometry="phi2", rope_parameters=dict(rope))
    d4, _ = make_checkpoint(geometry="phi2", rope_parameters=dict(rope), layout="4.x")
    assert "rope_scaling" in json.load(open(f"{d4}/config.json"))
    c5, c4 = PhiConfig.from_pretrained(d5), PhiConfig.from_pretrained(d4)
    assert c5 == c4
    assert c5.rotary_ndims == 32 and c5.head_dim == 80 and c5.rope_theta == 2000.0 and c5.rope_type == "linear"


def test_to_dict_loads_in_transformers():
    cfg = PhiConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                    qk_layernorm=True, rope_parameters=dict(rope_type="dynamic", factor=4.0, partial_rotary_factor=0.25),
                    layer_norm_eps=1e-3, id2label={0: "a", 1: "b", 2: "c"})
    t = transformers.PhiConfig.from_dict(cfg.to_dict())
    assert t.num_key_value_heads == 2 and t.qk_layernorm and t.layer_norm_eps == 1e-3 and t.num_labels == 3
    assert t.rope_parameters["rope_type"] == "dynamic" and t.rope_parameters["factor"] == 4.0
    assert t.rope_parameters["partial_rotary_factor"] == 0.25
    assert PhiConfig.from_dict(t.to_dict()) == cfg


@pytest.mark.parametrize("change, culprit", [
    (dict(hidden_act="swiglu"), "swiglu"),
    (dict(model_type="llama"), "llama"),
    (dict(rope_parameters=dict(rope_type="proportional", factor=2.0)), "proportional"),
    (dict(rope_scaling=dict(type="su", factor=2.0)), "'su'"),
    (dict(rope_scaling=dict(type="longrope", short_factor=[1.0] * 3, long_factor=[1.0] * 3)), "short_factor"),
    (dict(rope_parameters=dict(rope_type="llama3", factor=8.0)), "high_freq_factor"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, beta_fast=3)), "beta_fast"),
    (dict(rope_parameters=dict(rope_type="linear")), "factor"),
    (dict(some_new_field=3), "some_new_field"),
    (dict(num_attention_heads=3), "num_attention_heads=3"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
])
def test_unsupported_values_raise(change, culprit):
    d = transformers.PhiConfig(hidden_size=96, num_attention_heads=4).to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=culprit):
        PhiConfig.from_dict(d)


@pytest.mark.parametrize("preset, hf_kwargs", [
    (phi_jax.phi_1_5, dict()),
    (phi_jax.phi_2, dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, partial_rotary_factor=0.4)),
])
def test_full_size_presets_have_transformers_param_count(preset, hf_kwargs):
    with torch.device("meta"):
        ref = transformers.PhiForCausalLM(transformers.PhiConfig(**hf_kwargs))
    ref_count = sum(p.numel() for p in ref.parameters())
    abstract = nnx.eval_shape(lambda: phi_jax.PhiForCausalLM(preset(), rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == ref_count
    assert abstract.model.layers[0].self_attn.q_proj.kernel.shape == (preset().hidden_size,) * 2


@pytest.mark.parametrize("rope", [
    dict(rope_type="yarn", factor=4.0, beta_fast=8, original_max_position_embeddings=64),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=32),
])
def test_long_context_ropes_round_trip_through_transformers(rope):
    cfg = PhiConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                    max_position_embeddings=128, rope_parameters=dict(rope, partial_rotary_factor=0.5))
    t = transformers.PhiConfig.from_dict(cfg.to_dict())
    assert t.rope_parameters["rope_type"] == rope["rope_type"]
    back = PhiConfig.from_dict(t.to_dict())
    assert back == cfg
    # transformers' defaulting of original_max_position_embeddings is mirrored
    assert back.rope_parameters["original_max_position_embeddings"] == rope.get("original_max_position_embeddings",
                                                                                  128)
