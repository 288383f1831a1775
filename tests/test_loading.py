"""Loading and saving Hugging Face directories, and the errors bad checkpoints and inputs give."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import phi_jax
from conftest import rel_err


def _edit_safetensors(d, fn):
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_save_pretrained_loads_in_transformers(make_checkpoint, tmp_path):
    d, ref_model = make_checkpoint(geometry="phi2", qk_layernorm=True, num_key_value_heads=1)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    back = transformers.PhiForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref_model(ids).logits)
    # load -> save -> load is bit-exact
    again = phi_jax.PhiForCausalLM.from_pretrained(out)
    a, b = load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(np.asarray(again(jnp.ones((1, 4), int)).logits),
                                  np.asarray(model(jnp.ones((1, 4), int)).logits))


def test_save_tied_and_classifier(make_checkpoint, tmp_path):
    d, ref_model = make_checkpoint(geometry="phi1", tie_word_embeddings=True)
    phi_jax.PhiForCausalLM.from_pretrained(d).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    back = transformers.PhiForCausalLM.from_pretrained(tmp_path / "tied").eval()
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref_model(ids).logits)

    d, ref_model = make_checkpoint(geometry="phi1", cls="PhiForSequenceClassification", num_labels=4, pad_token_id=0)
    phi_jax.PhiForSequenceClassification.from_pretrained(d).save_pretrained(tmp_path / "cls")
    back = transformers.PhiForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    with torch.no_grad():
        assert torch.equal(back(ids + 1).logits, ref_model(ids + 1).logits)


def test_bfloat16_save_roundtrip(make_checkpoint, tmp_path):
    d, _ = make_checkpoint(geometry="phi1")
    model = phi_jax.PhiForCausalLM.from_pretrained(d, dtype=jnp.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert cfg["dtype"] == "bfloat16"
    back = transformers.PhiForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    # a float32 model saved cast to bf16: tensors and config.json both say bfloat16
    phi_jax.PhiForCausalLM.from_pretrained(d).save_pretrained(tmp_path / "cast", dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "cast" / "config.json"))["dtype"] == "bfloat16"
    cast = load_file(str(tmp_path / "cast" / "model.safetensors"))
    orig = load_file(os.path.join(d, "model.safetensors"))
    assert all(v.dtype == np.dtype("bfloat16") for v in cast.values())
    np.testing.assert_array_equal(cast["model.layers.0.mlp.fc1.weight"].astype(np.float32),
                                  orig["model.layers.0.mlp.fc1.weight"].astype("bfloat16").astype(np.float32))
    assert not [f for f in os.listdir(tmp_path / "cast") if f.startswith(".tmp")]


def test_inv_freq_buffer_is_skipped(make_checkpoint):
    d, ref_model = make_checkpoint(geometry="phi1", fmt="bin")
    path = os.path.join(d, "pytorch_model.bin")
    state = torch.load(path, weights_only=True)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(state, path)
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = ref_model(ids).logits.numpy()
    assert rel_err(model(jnp.asarray(ids.numpy())).logits, ref) <= 1e-4


def test_classifier_from_causal_lm_checkpoint_needs_opt_in(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    with pytest.raises(ValueError, match="score.weight"):
        phi_jax.PhiForSequenceClassification.from_pretrained(d)
    model = phi_jax.PhiForSequenceClassification.from_pretrained(d, allow_new_head=True)
    assert float(jnp.std(model.score.kernel[...])) > 0


# ---- errors ------------------------------------------------------------------------------------

def test_token_id_out_of_range(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    ids = np.zeros((2, 5), np.int32)
    ids[1, 3] = 96
    with pytest.raises(ValueError, match=r"token id 96 at position \(1, 3\).*vocab_size"):
        model(jnp.asarray(ids))
    ids[1, 3] = -1
    with pytest.raises(ValueError, match="token id -1"):
        phi_jax.compiled(model)(jnp.asarray(ids))


def test_mask_shape_mismatch(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        model(jnp.zeros((2, 5), int), jnp.ones((2, 4), int))


def test_missing_tensor(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    _edit_safetensors(d, lambda t: t.pop("model.layers.1.mlp.fc2.bias"))
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.mlp.fc2.bias'\]"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_unexpected_tensor(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    _edit_safetensors(d, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.extra.weight'\]"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_misshaped_tensor(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    _edit_safetensors(d, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                 np.zeros((32, 64), np.float32)))
    # the config's kv heads cannot give 32 rows: named before any model is built
    with pytest.raises(ValueError, match=r"config num_key_value_heads=4 does not fit the checkpoint: .*"
                                         r"model.layers.0.self_attn.k_proj.weight, which has shape \[32, 64\]"):
        phi_jax.PhiForCausalLM.from_pretrained(d)
    # a shape no config field describes: the plan names the tensor, its file and both shapes
    _edit_safetensors(d, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                 np.zeros((64, 64), np.float32)))
    _edit_safetensors(d, lambda t: t.__setitem__("model.layers.1.self_attn.dense.weight",
                                                 np.zeros((64, 32), np.float32)))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.dense.weight in .*model.safetensors: "
                                         r"checkpoint has \[64, 32\], the config expects \[64, 64\]"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_missing_paths(make_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        phi_jax.PhiForCausalLM.from_pretrained(tmp_path / "nowhere")
    d, _ = make_checkpoint(geometry="phi1")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        phi_jax.PhiForCausalLM.from_pretrained(d)
    d, _ = make_checkpoint(geometry="phi1", fmt="sharded")
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(d, victim))
    with pytest.raises(FileNotFoundError, match=victim):
        phi_jax.PhiForCausalLM.from_pretrained(d)
    d, _ = make_checkpoint(geometry="phi1")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_truncated_files(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=r"model.safetensors.*(truncated|corrupt)"):
        phi_jax.PhiForCausalLM.from_pretrained(d)
    d, _ = make_checkpoint(geometry="phi1", fmt="bin")
    path = os.path.join(d, "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*(truncated|corrupt)"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_bin_refuses_pickled_objects(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1", fmt="bin")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="weights-only"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("header", [
    [1, 2],
    {"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
    {"a": {"dtype": "X", "shape": [2], "data_offsets": [0, 8]}},
    {"a": "junk"},
])
def test_corrupt_safetensors_header_is_a_value_error(make_checkpoint, header):
    import struct
    d, _ = make_checkpoint(geometry="phi1")
    raw = json.dumps(header).encode()
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_corrupt_index_is_a_value_error(make_checkpoint):
    d, _ = make_checkpoint(geometry="phi1", fmt="sharded")
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": 3}}, f)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a valid weight index"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_naming_a_file_outside_its_directory_is_refused(make_checkpoint, tmp_path, where):
    """Shards lie beside their index: an index entry that names a file elsewhere (`../x`, an absolute path) is
    refused with the entry named, even when that file holds the right tensors (it loaded before 2026-11-27)."""
    d, _ = make_checkpoint(geometry="phi1", fmt="sharded")
    path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(path))
    shard = sorted(set(index["weight_map"].values()))[1]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(os.path.join(d, shard), outside / shard)
    name = f"../elsewhere/{shard}" if where == "relative" else str(outside / shard)
    assert os.path.exists(os.path.join(d, name))  # the entry does reach the moved shard
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"index.json: weight_map\['.+'\] = .*elsewhere.* is not a file name "
                                         r"beside the index"):
        phi_jax.PhiForCausalLM.from_pretrained(d)


def test_head_class_from_base_model_checkpoint(make_checkpoint):
    """A PhiModel checkpoint has no `model.` prefix; a classifier built on it maps its keys and adds the head."""
    d, ref_model = make_checkpoint(geometry="phi1", cls="PhiModel")
    model = phi_jax.PhiForSequenceClassification.from_pretrained(d, allow_new_head=True)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = ref_model(ids).last_hidden_state.numpy()
    assert rel_err(model.model(jnp.asarray(ids.numpy())).last_hidden_state, ref) <= 1e-4
