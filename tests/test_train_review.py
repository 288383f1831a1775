"""Fine-tuning as a user meets it: numpy settings, a truncated metrics log, a changed data file or model on
resume, LoRA options checked up front, the command's errors naming its flags, an export that is whole or absent."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.cli import main
from phi_jax.train.loop import RunConfig, finetune
from phi_jax.train.step import TrainConfig
from train_fixtures import TEXT, checkpoint_steps, metrics, tiny_run, write_char_tokenizer, write_jsonl


@pytest.fixture(autouse=True)
def _no_user_compile_cache(monkeypatch):
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")


@pytest.fixture
def tiny(make_checkpoint, tmp_path):
    return tiny_run(make_checkpoint, tmp_path)


def _common(path, data, **kw):
    return dict(model=path, data=data, batch_size=2, seq_len=16, save_every=2, progress=False, export=False, **kw)


def test_numpy_settings_save_and_resume(tiny, tmp_path):
    """RunConfig and TrainConfig accept numpy integers and floats: they reach the checkpoint's JSON meta as
    Python numbers (an np.int64 failed Orbax's save with a TypeError after the first interval)."""
    path, data = tiny
    run = RunConfig(output=str(tmp_path / "run"), steps=np.int64(2), seed=np.int64(3),
                    **{**_common(path, data), "batch_size": np.int32(2), "save_every": np.int64(1)},
                    train=TrainConfig(learning_rate=np.float32(1e-3), warmup_steps=np.int64(1)))
    losses = finetune(run)["losses"]
    assert sorted(losses) == [1, 2] and checkpoint_steps(tmp_path / "run") == [1, 2]
    assert finetune(dataclasses.replace(run, resume=True))["losses"] == losses


def test_truncated_metrics_line_does_not_block_resume(tiny, tmp_path):
    """A run killed while writing its metrics line (or on a full disk) leaves half a JSON line at the end of
    metrics.jsonl: the resume drops it; a damaged line elsewhere is an error naming file and line."""
    path, data = tiny
    out = tmp_path / "run"
    run = RunConfig(output=str(out), steps=2, **_common(path, data))
    losses = finetune(run)["losses"]
    log = out / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')
    assert finetune(dataclasses.replace(run, resume=True))["losses"] == losses
    assert [r["step"] for r in metrics(out)] == [1, 2]  # the half line is gone
    lines = log.read_text().splitlines(True)
    log.write_text(lines[0][:10] + "\n" + lines[1])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(log))}:1: not valid JSON"):
        finetune(dataclasses.replace(run, resume=True))


def test_resume_refuses_a_changed_data_file(tiny, tmp_path):
    """Another data file that packs to as many rows would give other batches: the resume refuses it, naming
    --data (the row count alone let it through)."""
    path, data = tiny
    run = RunConfig(output=str(tmp_path / "run"), steps=2, **_common(path, data))
    finetune(run)
    write_jsonl(data, [{"text": (TEXT * 3).replace("fox", "dog")}] * 4 + [{"prompt": "2+2=", "completion": "5!"}])
    with pytest.raises(ValueError, match=r"^cannot resume: the checkpoint has data_digest=\w+, this run \w+ "
                                         r"\(--data\)"):
        finetune(dataclasses.replace(run, resume=True))


def test_resume_refuses_another_model(tiny, make_checkpoint, tmp_path):
    """A resume onto a model of other shapes fails naming --model, in one line (it failed inside Orbax with a
    multi-line message about TensorStore)."""
    path, data = tiny
    run = RunConfig(output=str(tmp_path / "run"), steps=2, **_common(path, data))
    finetune(run)
    other, _ = make_checkpoint("phi1", num_hidden_layers=1, intermediate_size=64)
    write_char_tokenizer(other, 96)
    with pytest.raises(ValueError, match=r"^cannot resume: the checkpoint has model_config.intermediate_size=128, "
                                         r"this run 64 \(--model\)") as e:
        finetune(dataclasses.replace(run, model=other, resume=True))
    assert "\n" not in str(e.value)


def test_lora_resume_refuses_another_base_of_the_same_shapes(tiny, make_checkpoint, tmp_path):
    """A LoRA run restores only its adapters; the base comes from --model again. A model of the same architecture
    with other weights (here another seed) is refused naming --model; it trained on silently before."""
    path, data = tiny
    run = RunConfig(output=str(tmp_path / "run"), steps=2, lora_rank=2, **_common(path, data))
    finetune(run)
    other, _ = make_checkpoint("phi1", num_hidden_layers=1, intermediate_size=128, seed=1)
    write_char_tokenizer(other, 96)
    with pytest.raises(ValueError, match=r"^cannot resume: the checkpoint has base_weights=\w+, this run \w+ "
                                         r"\(--model\)"):
        finetune(dataclasses.replace(run, model=other, resume=True))
    assert sorted(finetune(dataclasses.replace(run, resume=True))["losses"]) == [1, 2]  # the same base resumes


def test_weights_fingerprint():
    """Equal for equal values (whatever the dict's order), different when one element changes, when two swap
    places or when a name changes; None for no arrays (full fine-tuning)."""
    from phi_jax.train.loop import weights_fingerprint
    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal((8, 16)).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}
    base = weights_fingerprint(a)
    assert base == weights_fingerprint({"b": a["b"].copy(), "w": a["w"].copy()})
    changed = a["w"].copy()
    changed[3, 5] = np.nextafter(changed[3, 5], np.float32(np.inf))  # one ulp
    swapped = a["w"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    others = [weights_fingerprint({**a, "w": changed}), weights_fingerprint({**a, "w": swapped}),
              weights_fingerprint({"w2": a["w"], "b": a["b"]}),
              weights_fingerprint({**a, "w": a["w"].astype(jnp.bfloat16)})]
    assert base not in others and len(set(others)) == len(others)
    assert weights_fingerprint({}) is None


@pytest.mark.parametrize("rank,alpha,message", [
    (0, 16.0, "RunConfig.lora_alpha=16.0 needs RunConfig.lora_rank >= 1 (LoRA's alpha scales the adapters), got "
              "RunConfig.lora_rank=0"),
    (2, float("nan"), "RunConfig.lora_alpha must be a finite number > 0 (None: RunConfig.lora_rank, scale 1), got nan"),
    (2, 0.0, "RunConfig.lora_alpha must be a finite number > 0 (None: RunConfig.lora_rank, scale 1), got 0.0"),
    (2, True, "RunConfig.lora_alpha must be a finite number > 0 (None: RunConfig.lora_rank, scale 1), got True"),
])
def test_lora_alpha_is_checked_by_the_config(rank, alpha, message):
    """--lora-alpha without --lora-rank was ignored (a full fine-tune); a bad alpha failed only after the data and
    the model were read."""
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        RunConfig(model="m", data="d", output="o", lora_rank=rank, lora_alpha=alpha)


@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--seed", "-1"], "--seed must be an int in [0, 2**63), got -1"),
    (["--accum-steps", "0"], "--accum-steps must be an int >= 1, got 0"),
    (["--seq-len", "1"], "--seq-len must be an int >= 2 (a row needs a token and the next one it predicts), got 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number > 0 (0: no clipping), got -1.0"),
    (["--lora-alpha", "8"], "--lora-alpha=8.0 needs --lora-rank >= 1 (LoRA's alpha scales the adapters), got "
                            "--lora-rank=0"),
    (["--lora-rank", "2", "--lora-alpha", "-1"], "--lora-alpha must be a finite number > 0, got -1.0"),
    (["--remat", "bogus"], "--remat must be a jax.checkpoint_policies name or phi_jax's dots_and_attention_saveable, "
                           "got 'bogus'"),
])
def test_cli_names_the_flag_of_a_bad_value(tiny, tmp_path, capsys, flags, message):
    """The checks live in RunConfig / TrainConfig; the command reports their error with its own flag, exit 2,
    before anything is read or written (a bad --remat surfaced only after the data and the model were read)."""
    path, _ = tiny
    out = tmp_path / "out"
    argv = ["finetune", "--model", path, "--data", str(tmp_path / "missing.jsonl"), "--output", str(out), *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


def _split(path):
    from phi_jax.modeling.model import PhiForCausalLM
    from phi_jax.train.step import split_model
    return split_model(PhiForCausalLM.from_pretrained(path), train=False)


def test_export_is_whole_or_absent(tiny, tmp_path, monkeypatch):
    """An export that fails while copying the tokenizer leaves no model directory without a tokenizer, and an
    earlier export as it was."""
    from phi_jax.train import loop
    path, _ = tiny
    split = _split(path)
    copy = shutil.copyfile

    def fail_on_tokenizer(src, dst, *a, **kw):
        if os.path.basename(dst) == "tokenizer.json":
            raise OSError(28, "No space left on device", dst)
        return copy(src, dst, *a, **kw)

    out = tmp_path / "model"
    monkeypatch.setattr(shutil, "copyfile", fail_on_tokenizer)
    with pytest.raises(OSError):
        loop.export(split, split.trainable, split.frozen, str(out), path)
    assert not out.exists()
    monkeypatch.setattr(shutil, "copyfile", copy)
    loop.export(split, split.trainable, split.frozen, str(out), path)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= set(before)
    monkeypatch.setattr(shutil, "copyfile", fail_on_tokenizer)
    with pytest.raises(OSError):
        loop.export(split, split.trainable, split.frozen, str(out), path)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".model")] == []  # no partial directory left



def test_diverged_run_stops_and_keeps_its_good_checkpoints(tiny, tmp_path):
    """A learning rate that blows the weights up: the run stops at the first step whose loss or gradient norm
    is not finite, saves nothing from it on and exports nothing (it trained on, wrote NaN checkpoints over the good
    ones, exported NaN weights and reported success)."""
    path, data = tiny
    out = tmp_path / "run"
    run = RunConfig(output=str(out), steps=8, **{**_common(path, data), "save_every": 1, "keep": 8, "export": True},
                    train=TrainConfig(learning_rate=1e30, max_grad_norm=None))
    with pytest.raises(ValueError, match=r"^step (\d+): the loss is \S+, the gradient norm \S+: training diverged "
                                         r"\(the checkpoints up to step (\d+) are kept\); lower --lr") as e:
        finetune(run)
    bad, kept = (int(g) for g in re.match(r"step (\d+).*up to step (\d+)", str(e.value)).groups())
    assert 1 < bad <= 8 and kept == bad - 1 and checkpoint_steps(out) == list(range(1, bad))
    assert not np.isfinite(metrics(out)[-1]["loss"] * metrics(out)[-1]["grad_norm"])
    assert all(np.isfinite(r["loss"]) for r in metrics(out)[:-1])
    assert not (out / "model").exists()


def test_tokenizer_truncation_and_padding_are_ignored(tmp_path):
    """A tokenizer.json that records truncation or padding (as some saved tokenizers do) tokenizes whole, unpadded
    documents for training (it cut every record to 4 tokens and trained on the pad tokens as targets)."""
    from tokenizers import Tokenizer

    from phi_jax.config import PhiConfig
    from phi_jax.train.data import load_dataset, load_tokenizer
    vocab = write_char_tokenizer(tmp_path, 96)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.enable_truncation(4)
    tok.enable_padding(length=6, pad_id=vocab["<unk>"], pad_token="<unk>")
    tok.save(str(tmp_path / "tokenizer.json"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick"}, {"prompt": "ab", "completion": "cd"}])
    rows = load_dataset(data, load_tokenizer(tmp_path), PhiConfig(vocab_size=96), seq_len=32)
    v = lambda s: [vocab[c] for c in s]  # noqa: E731
    eos = vocab["<|endoftext|>"]
    np.testing.assert_array_equal(rows["input_ids"][0, :15], v("the quick") + [eos] + v("abcd") + [eos])
    assert vocab["<unk>"] not in rows["labels"]


def test_attn_implementation_is_checked_by_the_config():
    """An unknown kernel name failed only once the data and the model had been read."""
    with pytest.raises(ValueError, match="RunConfig.attn_implementation must be one of xla, cudnn, pallas, auto, got "
                                         "'flash'"):
        RunConfig(model="m", data="d", output="o", attn_implementation="flash")
