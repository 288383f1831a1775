"""Validation loss during fine-tuning (`RunConfig.eval_data`, `phi-jax finetune --eval-data`): its value against
transformers' loss on the same held-out rows, its steps, its place in the log and the plot, and that it changes
nothing of the training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from phi_jax.cli import EXIT_OK, EXIT_USAGE, main
from phi_jax.train import data as data_lib
from phi_jax.train.evaluate import eval_batches
from phi_jax.train.loop import RunConfig, finetune
from phi_jax.train.step import TrainConfig
from train_fixtures import DROPOUT, TEXT, metrics, tiny_run, write_jsonl


@pytest.fixture(autouse=True)
def _no_user_compile_cache(monkeypatch):
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")


@pytest.fixture
def tiny(make_checkpoint, tmp_path):
    path, data = tiny_run(make_checkpoint, tmp_path, **DROPOUT)  # dropout on: eval must switch it off
    held_out = write_jsonl(tmp_path / "valid.jsonl", [{"text": "the lazy dog jumps. " * 2},
                                                       {"prompt": "3+4=", "completion": "7!"},
                                                       {"text": TEXT[::-1] * 2}])
    return path, data, held_out


def _reference_loss(model_dir: str, eval_file: str, seq_len: int) -> tuple[float, int]:
    """transformers' mean next-token loss over every target of the packed held-out rows (documents apart)."""
    from phi_jax.config import PhiConfig
    rows = data_lib.load_dataset(eval_file, data_lib.load_tokenizer(model_dir), PhiConfig.from_pretrained(model_dir),
                                 seq_len)
    tmodel = transformers.PhiForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    for r in range(len(rows["input_ids"])):
        segments = rows["attention_mask"][r]
        for seg in sorted(set(segments.tolist()) - {0}):  # each document alone: no attention across documents
            where = np.flatnonzero(segments == seg)
            ids = torch.tensor(rows["input_ids"][r, where][None], dtype=torch.long)
            labels = rows["labels"][r, where]
            with torch.no_grad():
                logits = tmodel(ids).logits[0, :-1].double()
            targets = torch.tensor(labels[1:], dtype=torch.long)
            keep = targets != -100
            nll += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return nll / count, count


def test_eval_loss_equals_transformers_on_the_held_out_rows_and_changes_no_training_loss(tiny, tmp_path):
    path, data, held_out = tiny
    common = dict(model=path, data=data, steps=4, batch_size=4, seq_len=32, save_every=4, progress=False,
                  train=TrainConfig(learning_rate=3e-3))
    plain = finetune(RunConfig(output=str(tmp_path / "plain"), **common))
    run = finetune(RunConfig(output=str(tmp_path / "eval"), eval_data=held_out, eval_every=2, **common))
    assert run["losses"] == plain["losses"]  # evaluating draws no key and moves no state
    assert sorted(run["eval_losses"]) == [2, 4]
    want, targets = _reference_loss(run["export"], held_out, 32)
    assert abs(run["eval_losses"][4] - want) <= 1e-4 * want, (run["eval_losses"][4], want)
    rows = {r["step"]: r for r in metrics(tmp_path / "eval")}
    assert [s for s, r in rows.items() if "eval_loss" in r] == [2, 4]
    assert rows[4]["eval_loss"] == run["eval_losses"][4] and rows[4]["eval_targets"] == targets
    assert "eval_loss" not in metrics(tmp_path / "plain")[-1]


def test_a_short_last_batch_counts_only_its_rows():
    rows = {"input_ids": np.arange(5)[:, None] * np.ones((1, 4), int), "labels": np.arange(5)[:, None] + np.zeros(
        (1, 4), int)}
    batches = eval_batches(rows, 4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4]
    assert (batches[1]["labels"][1:] == -100).all() and (batches[1]["labels"][0] == 4).all()


def test_eval_every_defaults_to_save_every_and_the_last_step_is_evaluated(tiny, tmp_path):
    path, data, held_out = tiny
    run = finetune(RunConfig(model=path, data=data, output=str(tmp_path / "r"), steps=5, batch_size=4, seq_len=32,
                             save_every=2, progress=False, export=False, eval_data=held_out))
    assert sorted(run["eval_losses"]) == [2, 4, 5]


def test_eval_settings_are_checked_up_front(tiny, tmp_path):
    path, data, held_out = tiny
    with pytest.raises(ValueError, match="RunConfig.eval_every=3 needs RunConfig.eval_data"):
        RunConfig(model=path, data=data, output=str(tmp_path / "r"), eval_every=3)
    with pytest.raises(ValueError, match="RunConfig.eval_every must be an int >= 1"):
        RunConfig(model=path, data=data, output=str(tmp_path / "r"), eval_data=held_out, eval_every=0)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"txt": "no"}])
    with pytest.raises(ValueError, match="bad.jsonl:2"):  # before any step is trained
        finetune(RunConfig(model=path, data=data, output=str(tmp_path / "r"), steps=2, batch_size=4, seq_len=32,
                           progress=False, eval_data=bad))
    assert not os.path.exists(tmp_path / "r")  # finetune() removes the run directory it made


def test_cli_eval_data(tiny, tmp_path, capsys):
    path, data, held_out = tiny
    out = tmp_path / "cli"
    argv = ["finetune", "--model", path, "--data", data, "--output", str(out), "--steps", "2", "--batch-size", "4",
            "--seq-len", "32", "--no-progress", "--eval-data", held_out, "--eval-every", "1"]
    assert main(argv) == EXIT_OK
    assert [("eval_loss" in r) for r in metrics(out)] == [True, True]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(argv[:-4] + ["--eval-every", "1"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-every" in err[0] and "--eval-data" in err[0], err
    with open(out / "metrics.jsonl") as f:
        assert all(isinstance(json.loads(line)["eval_loss"], float) for line in f)
