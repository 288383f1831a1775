"""Conversion round trips (HF -> Orbax -> HF), Microsoft layouts, and the safety rules of phi_jax.convert."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from conftest import rel_err
from safetensors.torch import save_file

import phi_jax
from phi_jax import convert
from phi_jax.cli import convert as convert_cmd

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


@pytest.mark.parametrize("geometry,cls,fmt,extra", [
    ("phi1", "PhiForCausalLM", "sharded", {}),
    ("phi2", "PhiForCausalLM", "bin", {}),
    ("phi1", "PhiForCausalLM", "safetensors", {"tie_word_embeddings": True}),
    ("phi1", "PhiForSequenceClassification", "safetensors", {"pad_token_id": 0}),
])
def test_hf_orbax_hf_is_bit_exact(make_checkpoint, tmp_path, geometry, cls, fmt, extra):
    src, ref = make_checkpoint(geometry, cls=cls, fmt=fmt, **extra)
    for name in ("tokenizer.json", "merges.txt"):
        with open(os.path.join(src, name), "w") as f:
            f.write(f"{name} contents")
    convert.hf_to_orbax(src, tmp_path / "orbax")
    assert os.path.exists(tmp_path / "orbax" / "tokenizer.json")
    convert.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", shard_size="40KB")
    with open(tmp_path / "hf" / "merges.txt") as f:
        assert f.read() == "merges.txt contents"
    out = getattr(transformers, cls).from_pretrained(tmp_path / "hf").eval()
    a, b = ref.state_dict(), out.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(ref(IDS).logits, out(IDS).logits)
    # from_pretrained reads the Orbax directory too
    ours = getattr(phi_jax, cls).from_pretrained(tmp_path / "orbax")
    assert rel_err(ours(IDS.numpy()).logits, _logits(ref).numpy()) <= 1e-4


def test_sharded_output_has_index_and_loads(make_checkpoint, tmp_path):
    src, ref = make_checkpoint("phi2")
    convert.hf_to_orbax(src, tmp_path / "orbax")
    convert.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", shard_size="100KB")
    files = sorted(os.listdir(tmp_path / "hf"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 3 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(ref.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ref.state_dict().values())
    for shard in shards:  # every shard within the limit unless it holds one larger tensor
        size = os.path.getsize(tmp_path / "hf" / shard)
        assert size <= 100_000 + 4096 or sum(v == shard for v in index["weight_map"].values()) == 1
    out = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(ref), _logits(out))


def test_bfloat16_path(make_checkpoint, tmp_path):
    """bf16 tensors are the float32 ones rounded (as torch rounds); logits within 3e-2 std (measured ~1e-2)."""
    src, ref = make_checkpoint("phi1")
    convert.hf_to_orbax(src, tmp_path / "orbax", dtype="bfloat16")
    convert.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    out = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    sd = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf", dtype=None).state_dict()
    for k, v in ref.state_dict().items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], v.bfloat16()), k
    err = rel_err(_logits(out).numpy(), _logits(ref).numpy())
    assert 1e-4 < err <= 3e-2, err  # > 1e-4: the weights really were rounded


def _legacy_state(model, style):
    """A transformers Phi state dict renamed and fused into Microsoft's original layouts."""
    sd, n = model.state_dict(), model.config.num_hidden_layers
    out = {}
    if style == "phi-msft":
        block, emb, head = "transformer.h.{}.", "transformer.embd.wte.weight", "lm_head."
    else:
        block, emb, head = "layers.{}.", "layers.0.wte.weight", f"layers.{n + 1}."
    out[emb] = sd["model.embed_tokens.weight"]
    for i in range(n):
        b = block.format(i if style == "phi-msft" else i + 1)
        hf = f"model.layers.{i}."
        for leaf in ("weight", "bias"):
            out[b + f"ln.{leaf}"] = sd[hf + f"input_layernorm.{leaf}"]
            out[b + f"mixer.Wqkv.{leaf}"] = torch.cat([sd[hf + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            out[b + f"mixer.out_proj.{leaf}"] = sd[hf + f"self_attn.dense.{leaf}"]
            out[b + f"mlp.fc1.{leaf}"] = sd[hf + f"mlp.fc1.{leaf}"]
            out[b + f"mlp.fc2.{leaf}"] = sd[hf + f"mlp.fc2.{leaf}"]
        out[b + "mixer.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer the originals carry; skipped
    for leaf in ("weight", "bias"):
        out[head + f"ln.{leaf}"] = sd[f"model.final_layernorm.{leaf}"]
        out[head + f"linear.{leaf}"] = sd[f"lm_head.{leaf}"]
    return {k: v.contiguous() for k, v in out.items()}


def _legacy_config(model, style):
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    d = {"model_type": style, "n_embd": c.hidden_size, "n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads,
         "n_inner": c.intermediate_size, "rotary_dim": int(head_dim * c.rope_parameters["partial_rotary_factor"]),
         "n_positions": c.max_position_embeddings, "layer_norm_epsilon": c.layer_norm_eps,
         "activation_function": "gelu_new", "vocab_size": c.vocab_size, "embd_pdrop": 0.0, "resid_pdrop": 0.1,
         "initializer_range": 0.02, "tie_word_embeddings": False, "pad_vocab_size_multiple": 64,
         "torch_dtype": "float32", "architectures": ["PhiForCausalLM"], "auto_map": {}}
    if style == "phi-msft":
        d.update(n_head_kv=None, flash_attn=False, flash_rotary=False, fused_dense=False, attn_pdrop=0.0,
                 img_processor=None)
    else:
        d.update(architecture={"block_cls": "parallel", "mixer": {}, "mlp": {"mlp_cls": "mlp"}},
                 embd_layer="default", phyagi_version="0.0.4.dev")
    return d


def _write_legacy(directory, model, style, fmt):
    os.makedirs(directory)
    state = _legacy_state(model, style)
    if fmt == "safetensors":
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(_legacy_config(model, style), f)
    return str(directory)


@pytest.mark.parametrize("style,geometry,fmt", [("phi-msft", "phi2", "safetensors"),
                                                ("mixformer-sequential", "phi1", "bin")])
def test_microsoft_layouts(make_checkpoint, tmp_path, style, geometry, fmt):
    _, ref = make_checkpoint(geometry)
    src = _write_legacy(tmp_path / "legacy", ref, style, fmt)
    assert convert.detect_layout(src) == "legacy"
    convert.legacy_to_hf(src, tmp_path / "hf")
    out = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(ref), _logits(out))
    # straight into our model, and through Orbax
    ours = phi_jax.PhiForCausalLM.from_pretrained(src)
    assert rel_err(ours(IDS.numpy()).logits, _logits(ref).numpy()) <= 1e-4
    # one plan for every layout: a classifier from a Microsoft checkpoint, its head new (lm_head skipped)
    with pytest.raises(ValueError, match="score.weight"):
        phi_jax.PhiForSequenceClassification.from_pretrained(src)
    cls_model = phi_jax.PhiForSequenceClassification.from_pretrained(src, allow_new_head=True)
    np.testing.assert_array_equal(cls_model.model.layers[1].mlp.fc2.kernel[...], ours.model.layers[1].mlp.fc2.kernel[...])
    convert.legacy_to_orbax(src, tmp_path / "orbax")
    ours = phi_jax.PhiForCausalLM.from_pretrained(tmp_path / "orbax")
    assert rel_err(ours(IDS.numpy()).logits, _logits(ref).numpy()) <= 1e-4
    c = ref.config
    assert ours.config.rotary_ndims == int(c.hidden_size // c.num_attention_heads * c.rope_parameters["partial_rotary_factor"])


def test_legacy_config_errors(make_checkpoint, tmp_path):
    _, ref = make_checkpoint("phi2")
    src = _write_legacy(tmp_path / "legacy", ref, "phi-msft", "safetensors")
    cfg = os.path.join(src, "config.json")
    d = _legacy_config(ref, "phi-msft")
    for change, message in (({"mystery_knob": 3}, "mystery_knob"), ({"rotary_dim": 81}, "rotary_dim=81"),
                            ({"n_layer": 3}, "num_hidden_layers=3"), ({"n_inner": 64}, "mlp.fc1.weight")):
        with open(cfg, "w") as f:
            json.dump({**d, **change}, f)
        with pytest.raises(ValueError, match=message):
            convert.legacy_to_hf(src, tmp_path / "out")
        assert not os.path.exists(tmp_path / "out")


def test_truncated_file_names_file_and_tensor(make_checkpoint, tmp_path):
    src, _ = make_checkpoint("phi1")
    file = os.path.join(src, "model.safetensors")
    os.truncate(file, os.path.getsize(file) - 100)
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated.*tensor '[\w.]+'"):
        convert.hf_to_orbax(src, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_config_that_does_not_fit_the_weights(make_checkpoint, tmp_path):
    src, _ = make_checkpoint("phi1")
    with open(os.path.join(src, "config.json")) as f:
        d = json.load(f)
    d["intermediate_size"] = 128
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match=r"config intermediate_size=128 does not fit the checkpoint: "
                                         r"model\.layers\.0\.mlp\.fc1\.weight in .*model\.safetensors has shape "
                                         r"\[256, 64\]"):
        convert.hf_to_orbax(src, tmp_path / "out")


def test_failure_midway_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    src, _ = make_checkpoint("phi1")
    calls = []

    def failing_get(self, key, rows=None):
        calls.append(key)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return self._w.get(key, rows)

    monkeypatch.setattr(convert.HFSource, "get", failing_get)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, tmp_path / "out", to="hf", shard_size="20KB")
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_overwrite_is_required(make_checkpoint, tmp_path, capsys):
    src, ref = make_checkpoint("phi1")
    dst = tmp_path / "out"
    assert convert_cmd.main("hf-to-orbax", [src, str(dst), "--no-progress"]) == 0
    assert convert_cmd.main("hf-to-orbax", [src, str(dst), "--no-progress", "--dtype", "bfloat16"]) == 4  # exists: status 4
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(FileExistsError):
        convert.hf_to_orbax(src, dst)
    assert phi_jax.PhiForCausalLM.from_pretrained(dst).lm_head.kernel[...].dtype == np.float32
    assert convert_cmd.main("hf-to-orbax", [src, str(dst), "--no-progress", "--dtype", "bfloat16",
                                            "--overwrite"]) == 0
    with open(dst / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert convert.OrbaxSource(dst).tensors["lm_head.weight"][1] == "bfloat16"
    assert not _leftovers(tmp_path)


def test_cli_dispatch(make_checkpoint, tmp_path):
    from phi_jax.cli import main
    src, ref = make_checkpoint("phi1")
    assert main(["convert", "hf-to-orbax", src, str(tmp_path / "o"), "--no-progress"]) == 0
    assert main(["convert", "orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "h"), "--no-progress"]) == 0
    out = transformers.PhiForCausalLM.from_pretrained(tmp_path / "h").eval()
    assert torch.equal(_logits(ref), _logits(out))
    assert main(["convert", "orbax-to-hf", str(tmp_path / "missing"), str(tmp_path / "x"), "--no-progress"]) == 3


def test_tiled_copies_equal_numpy():
    from phi_jax.io.safetensors import contiguous, tiled_copy
    a = np.random.default_rng(0).standard_normal((700, 300)).astype(np.float32)
    for view in (a.T, a.T[10:523], a[:, 5:290].T):
        out = contiguous(view, np.float16)
        assert out.flags.c_contiguous and out.dtype == np.float16
        np.testing.assert_array_equal(out, view.astype(np.float16))
    dst = np.zeros((300, 900), np.float32)
    tiled_copy(dst[:, 100:800], a.T)
    np.testing.assert_array_equal(dst[:, 100:800], a.T)
    assert not dst[:, :100].any() and not dst[:, 800:].any()



def test_source_closed_when_convert_refuses_before_copying(make_checkpoint, tmp_path, monkeypatch):
    """A conversion refused after the source is open (destination = source, or an existing destination) closes
    the source too: before, only a failure during the copy did, and the refusals left its files open."""
    d, _ = make_checkpoint("phi1")
    events, real_open = [], convert.open_source

    def recording_open(*a, **kw):
        source = real_open(*a, **kw)
        real_close = source.close
        source.close = lambda: (events.append("closed"), real_close())[1]
        events.append("open")
        return source

    monkeypatch.setattr(convert, "open_source", recording_open)
    with pytest.raises(ValueError, match="same directory"):
        convert.convert(d, d, to="hf")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError):
        convert.convert(d, existing, to="orbax")
    convert.convert(d, tmp_path / "out", to="orbax")  # and once after a whole conversion, as before
    assert events == ["open", "closed"] * 3
