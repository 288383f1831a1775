"""LoRA: adapters start as the identity, merged equals unmerged, a LoRA run trains only adapters and exports
a plain checkpoint that transformers loads with the unmerged model's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from conftest import rel_err
from phi_jax.modeling.model import PhiForCausalLM
from phi_jax.train.lora import add_lora, merge_lora
from phi_jax.train.loop import RunConfig, finetune
from phi_jax.train.step import TrainConfig, split_model
from train_fixtures import TEXT, write_char_tokenizer, write_jsonl

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 10)), jnp.int32)


def test_lora_merged_equals_unmerged(make_checkpoint):
    path, _ = make_checkpoint("phi1", qk_layernorm=True, num_key_value_heads=2)
    base = PhiForCausalLM.from_pretrained(path)(IDS).logits
    model = add_lora(PhiForCausalLM.from_pretrained(path), rank=4)
    np.testing.assert_array_equal(model(IDS).logits, base)  # B = 0: the base model exactly
    n = 0
    key = jax.random.key(1)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        key, sub = jax.random.split(key)
        v.set_value(0.2 * jax.random.normal(sub, v.get_value().shape))
        n += 1
    assert n == 2 * 6 * 2  # A and B on q, k, v, dense, fc1, fc2 in each of 2 layers
    unmerged = model(IDS).logits
    assert rel_err(unmerged, base) > 0.05  # the adapters matter
    merged_model = merge_lora(model)
    assert not nnx.state(merged_model, nnx.LoRAParam)
    assert rel_err(merged_model(IDS).logits, unmerged) <= 1e-5


def test_lora_run_trains_adapters_only(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("phi1", num_hidden_layers=1, intermediate_size=128)
    write_char_tokenizer(path, 96)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": TEXT * 2}] * 4)
    split = split_model(add_lora(PhiForCausalLM.from_pretrained(path), 2), nnx.LoRAParam)
    assert split.trainable and all(".lora.lora_" in k for k in split.trainable)
    assert "model.layers.0.mlp.fc1.kernel" in split.frozen
    run = RunConfig(model=path, data=data, output=str(tmp_path / "run"), steps=6, batch_size=2, seq_len=24,
                    lora_rank=2, progress=False, train=TrainConfig(learning_rate=1e-2))
    result = finetune(run)
    losses = result["losses"]
    assert losses[6] < losses[1]
    tmodel = transformers.PhiForCausalLM.from_pretrained(result["export"]).eval()
    with torch.no_grad():
        ref = tmodel(torch.tensor(np.asarray(IDS), dtype=torch.long)).logits.numpy()
    exported = PhiForCausalLM.from_pretrained(result["export"])
    assert rel_err(exported(IDS).logits, ref) <= 1e-4
    assert rel_err(exported(IDS).logits, PhiForCausalLM.from_pretrained(path)(IDS).logits) > 1e-3  # it changed


def test_lora_alpha_scales_the_update_and_the_merge(make_checkpoint):
    """LoRA's scale alpha / rank: the adapters' contribution at alpha = 3 * rank is 3x that at alpha = rank, in
    the unmerged model and in the merged kernels alike."""
    path, _ = make_checkpoint("phi1", num_hidden_layers=1)
    x = jax.random.normal(jax.random.key(3), (5, 64))
    outs, merged = {}, {}
    for alpha in (None, 12.0):
        model = add_lora(PhiForCausalLM.from_pretrained(path), rank=4, alpha=alpha)
        lin = model.model.layers[0].self_attn.q_proj
        assert lin.lora_scale == (1.0 if alpha is None else 3.0)
        lin.lora.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(4), lin.lora.lora_b.get_value().shape))
        outs[alpha] = lin(x) - x @ lin.kernel[...] - lin.bias[...]
        merged[alpha] = merge_lora(model).model.layers[0].self_attn.q_proj.kernel[...]
    base = PhiForCausalLM.from_pretrained(path).model.layers[0].self_attn.q_proj.kernel[...]
    assert rel_err(outs[12.0], 3.0 * outs[None]) <= 1e-5
    assert rel_err(merged[12.0] - base, 3.0 * (merged[None] - base)) <= 1e-5


def test_lora_bad_rank_or_alpha_is_a_clear_error(make_checkpoint):
    path, _ = make_checkpoint("phi1", num_hidden_layers=1)
    model = PhiForCausalLM.from_pretrained(path)
    for kw, word in ((dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rank=2, alpha=0), "alpha"),
                     (dict(rank=2, alpha=float("nan")), "alpha"), (dict(rank=2, alpha="8"), "alpha")):
        try:
            add_lora(model, **kw)
        except ValueError as e:
            assert word in str(e)
        else:
            raise AssertionError(f"no error for {kw}")
