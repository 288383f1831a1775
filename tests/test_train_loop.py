"""Fine-tuning end to end: the loss falls, the export loads in transformers, resume is exact, bad data errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import rel_err
from phi_jax.modeling.model import PhiForCausalLM
from phi_jax.train.loop import RunConfig, finetune
from phi_jax.train.step import TrainConfig
from train_fixtures import DROPOUT, checkpoint_steps, metrics, tiny_run, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_user_compile_cache(monkeypatch):
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")  # `phi-jax finetune` compiles: never into ~/.cache here


@pytest.fixture
def tiny(make_checkpoint, tmp_path):
    return tiny_run(make_checkpoint, tmp_path)


@pytest.fixture
def tiny_dropout(make_checkpoint, tmp_path):
    return tiny_run(make_checkpoint, tmp_path, **DROPOUT)


def test_finetune_learns_and_exports(tiny, tmp_path):
    path, data = tiny
    run = RunConfig(model=path, data=data, output=str(tmp_path / "run"), steps=40, batch_size=4, seq_len=32,
                    save_every=20, progress=False, train=TrainConfig(learning_rate=3e-3, warmup_steps=4))
    result = finetune(run)
    losses = result["losses"]
    assert sorted(losses) == list(range(1, 41))
    assert losses[40] * 5 <= losses[1], (losses[1], losses[40])
    out = tmp_path / "run"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 41)) and rows[0]["tokens_per_s"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint_steps(out) == [20, 40]  # every --save-every steps, no more
    # the export loads in transformers and gives phi_jax's logits
    ids = np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32)
    tmodel = transformers.PhiForCausalLM.from_pretrained(result["export"]).eval()
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = PhiForCausalLM.from_pretrained(result["export"])(jnp.asarray(ids)).logits
    assert rel_err(ours, ref) <= 1e-4
    assert os.path.exists(os.path.join(result["export"], "tokenizer.json"))


def test_killed_run_resumes_exactly(tiny, tmp_path):
    """A subprocess killed (SIGKILL) after a checkpoint, resumed, gives the uninterrupted run's losses (SIGTERM:
    test_terminated_dropout_run_resumes_exactly_and_keeps_the_last_k, tests/test_cli_finetune.py)."""
    path, data = tiny
    common = dict(model=path, data=data, steps=60, batch_size=2, seq_len=16, save_every=10, progress=False,
                  export=False, train=TrainConfig(learning_rate=1e-3, warmup_steps=10))
    want = finetune(RunConfig(output=str(tmp_path / "full"), **common))["losses"]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "phi_jax.cli", "finetune", "--model", path, "--data", data, "--output", str(out),
           "--steps", "60", "--batch-size", "2", "--seq-len", "16", "--save-every", "10", "--lr", "1e-3",
           "--warmup-steps", "10", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(d.isdigit() for d in os.listdir(ckpts)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert min(int(d) for d in os.listdir(ckpts) if d.isdigit()) < 60
    got = finetune(RunConfig(output=str(out), resume=True, **common))["losses"]
    assert got == want


def test_terminated_dropout_run_resumes_exactly_and_keeps_the_last_k(tiny_dropout, tmp_path, monkeypatch):
    """With dropout: a run sent SIGTERM during step 7 finishes it, saves step 7 (off the 2-step interval) and
    returns; resumed, it continues from its newest checkpoint (7, not 6) to the uninterrupted run's losses. Six
    or more checkpoints are written with --keep 2: exactly the last two remain."""
    from phi_jax.cli.common import compile_cache
    path, data = tiny_dropout
    common = dict(model=path, data=data, steps=12, batch_size=2, seq_len=16, save_every=2, keep=2, progress=False,
                  export=False, train=TrainConfig(learning_rate=1e-3, warmup_steps=2))
    # JAX's persistent cache (as `phi-jax finetune` uses it): the three runs compile their programs once
    cache = argparse.Namespace(compile_cache=str(tmp_path / "cache"), no_compile_cache=False)
    with compile_cache(cache):
        _terminate_and_resume(common, tmp_path, monkeypatch)


def _terminate_and_resume(common, tmp_path, monkeypatch):
    from phi_jax.train import data as data_lib
    from phi_jax.train.step import token_losses
    path, data = common["model"], common["data"]
    want = finetune(RunConfig(output=str(tmp_path / "full"), **common))["losses"]
    assert sorted(want) == list(range(1, 13))
    assert checkpoint_steps(tmp_path / "full") == [10, 12]  # 2, 4, ..., 12 written
    # dropout is on in the loop: step 1's loss (before any update) is not the model's loss without dropout
    model = PhiForCausalLM.from_pretrained(path)
    first = data_lib.batch_at(data_lib.load_dataset(data, data_lib.load_tokenizer(path), model.config, 16), 0, 2, 0)
    logits = model(*(jnp.asarray(first[k]) for k in ("input_ids", "attention_mask", "position_ids"))).logits
    nll, count = token_losses(logits, jnp.asarray(first["labels"]))
    no_dropout = float(nll / count)
    assert abs(want[1] - no_dropout) > 1e-3 * no_dropout, (want[1], no_dropout)

    out = tmp_path / "terminated"
    batch_at = data_lib.batch_at

    def sigterm_during_step_7(rows, step, *args):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_at(rows, step, *args)

    monkeypatch.setattr(data_lib, "batch_at", sigterm_during_step_7)
    first_run = finetune(RunConfig(output=str(out), **common))
    monkeypatch.setattr(data_lib, "batch_at", batch_at)
    assert first_run["interrupted"] and sorted(first_run["losses"]) == list(range(1, 8))
    assert checkpoint_steps(out) == [6, 7]
    logged = metrics(out)
    got = finetune(RunConfig(output=str(out), resume=True, **common))
    assert got["losses"] == want and not got["interrupted"]
    assert checkpoint_steps(out) == [10, 12]
    assert metrics(out)[:7] == logged  # steps 1..7 not rerun (their times unchanged): resumed from 7, the newest
    assert [r["loss"] for r in metrics(out)] == [want[s] for s in range(1, 13)]


def test_resume_refuses_other_settings(tiny, tmp_path):
    """A resume with another value of a setting that changes the steps computed fails with one line naming it and
    both values; the same settings resume; a checkpoint that does not record a setting leaves it unchecked."""
    from phi_jax.train.loop import check_resume
    path, data = tiny
    common = dict(model=path, data=data, output=str(tmp_path / "run"), batch_size=2, seq_len=16, save_every=2,
                  progress=False, export=False)
    train = TrainConfig(learning_rate=1e-3, warmup_steps=1)
    losses = finetune(RunConfig(steps=4, train=train, **common))["losses"]
    for changed, message in [
        (dict(steps=6), "the checkpoint has steps=4, this run 6 (--steps)"),
        (dict(train=TrainConfig(learning_rate=2e-3, warmup_steps=1)),
         "the checkpoint has learning_rate=0.001, this run 0.002 (--lr)"),
        (dict(train=TrainConfig(learning_rate=1e-3, warmup_steps=1, remat_policy="nothing_saveable")),
         "the checkpoint has remat_policy=None, this run nothing_saveable (--remat)"),
        (dict(compute_dtype="bfloat16"), "the checkpoint has compute_dtype=float32, this run bfloat16 (--dtype)"),
    ]:
        run = RunConfig(**{"steps": 4, "train": train, **common, **changed}, resume=True)
        with pytest.raises(ValueError, match=r"^cannot resume: " + re.escape(message)):
            finetune(run)
    assert finetune(RunConfig(steps=4, train=train, resume=True, **common))["losses"] == losses
    assert checkpoint_steps(tmp_path / "run") == [2, 4]
    assert check_resume({"steps": 4}, {"steps": 4, "learning_rate": 1e-3}) == ["learning_rate"]


@pytest.mark.parametrize("line,message", [
    ('{"text": "ok"}\n{"txt": "oops"}', "data.jsonl:2: expected keys"),
    ('{"text": "ok"}\nnot json', "data.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": 3}', "data.jsonl:1: field 'completion' must be a string"),
])
def test_bad_record_names_the_line(tmp_path, line, message):
    from phi_jax.train.data import read_records
    p = tmp_path / "data.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_records(p)


def test_record_that_is_not_utf8_names_the_line(tmp_path):
    from phi_jax.train.data import read_records
    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="data.jsonl:2: not UTF-8"):
        read_records(p)


def test_cli(tiny, tmp_path, capsys):
    from phi_jax.cli import main
    path, data = tiny
    out = tmp_path / "cli"
    argv = ["finetune", "--model", path, "--data", data, "--output", str(out), "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--mesh", "data=1,fsdp=1,tensor=1", "--lora-rank", "2", "--lora-alpha", "4",
            "--remat", "nothing_saveable"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "loss" in err and "tok_s" in err  # the tqdm bar
    assert {"metrics.jsonl", "loss.png", "model", "checkpoints"} <= set(os.listdir(out))
    assert main(argv) == 4  # checkpoints exist and no --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(argv[:-3] + ["8", "--remat", "nothing_saveable", "--resume"]) == 2  # another alpha than saved
    assert "cannot resume: the checkpoint has lora_scale=2.0, this run 4.0" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": 1}'])
    assert main(["finetune", "--model", path, "--data", bad, "--output", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2: field 'text' must be a string" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "nope"), "--data", data, "--output", str(tmp_path / "y")]) == 3
