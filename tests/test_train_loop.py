"""Fine-tuning end to end: the loss falls, the export loads in transformers, resume is exact, bad data errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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
from train_fixtures import TEXT, write_char_tokenizer, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("phi1", num_hidden_layers=1, intermediate_size=128)
    write_char_tokenizer(path, 96)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": TEXT * 3}] * 4 + [{"prompt": "2+2=", "completion": "4!"}])
    return path, data


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
    assert sorted(os.listdir(out / "checkpoints"))[-2:] == ["20", "40"]
    # the export loads in transformers and gives phi_jax's logits
    ids = np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32)
    tmodel = transformers.PhiForCausalLM.from_pretrained(result["export"]).eval()
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = PhiForCausalLM.from_pretrained(result["export"])(jnp.asarray(ids)).logits
    assert rel_err(ours, ref) <= 1e-4
    assert os.path.exists(os.path.join(result["export"], "tokenizer.json"))


def test_killed_run_resumes_exactly(tiny, tmp_path):
    """A subprocess killed (SIGKILL) after a checkpoint, resumed, gives the uninterrupted run's losses."""
    path, data = tiny
    common = dict(model=path, data=data, steps=60, batch_size=2, seq_len=16, save_every=10, progress=False,
                  export=False, train=TrainConfig(learning_rate=1e-3, warmup_steps=10))
    want = finetune(RunConfig(output=str(tmp_path / "full"), **common))["losses"]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import sys; from phi_jax.cli import main; sys.exit(main())", "finetune", "--model", path, "--data", data, "--output", str(out),
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

    # SIGTERM: the run saves the step it finished and returns; resuming again gives the same losses
    out = tmp_path / "terminated"

    def term_after_first_checkpoint():
        while not ((out / "checkpoints").exists() and any(d.isdigit() for d in os.listdir(out / "checkpoints"))):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=term_after_first_checkpoint, daemon=True)
    timer.start()
    first = finetune(RunConfig(output=str(out), **common))
    timer.join()
    assert first["interrupted"] and max(first["losses"]) < 60
    steps = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert steps[-1] == max(first["losses"])  # saved at the interruption, off the 5-step interval or not
    got = finetune(RunConfig(output=str(out), resume=True, **common))["losses"]
    assert got == want


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
            "--seq-len", "16", "--mesh", "data=1,fsdp=1,tensor=1", "--lora-rank", "2", "--lora-alpha", "4", "--remat", "nothing_saveable"]
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
