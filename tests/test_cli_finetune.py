"""`phi-jax finetune` as a user runs it: SIGTERM to a real process (exit 143, a checkpoint at the step it
finished), `--resume` through the command line to the uninterrupted run's losses, the compilation cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from phi_jax.cli import main
from train_fixtures import DROPOUT, checkpoint_steps, metrics, tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100


def test_sigterm_then_resume_through_the_cli(make_checkpoint, tmp_path, capsys):
    """With dropout on: a `phi-jax finetune` process sent SIGTERM after its first checkpoint finishes its step,
    saves it and exits 143 without exporting; `phi-jax finetune --resume` ends at --steps with the losses of an
    uninterrupted run. The process writes programs into --compile-cache; the in-process runs load them."""
    path, data = tiny_run(make_checkpoint, tmp_path, **DROPOUT)
    cache = tmp_path / "cache"

    def argv(out, *extra):
        return ["finetune", "--model", path, "--data", data, "--output", str(out), "--steps", str(STEPS),
                "--batch-size", "2", "--seq-len", "16", "--save-every", "10", "--lr", "1e-3", "--warmup-steps", "10",
                "--no-progress", "--compile-cache", str(cache), *extra]

    out = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, "-m", "phi_jax.cli", *argv(out)], env={**os.environ, "PYTHONPATH": ROOT},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints").exists() and checkpoint_steps(out):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    done = metrics(out)[-1]["step"]
    assert 10 <= done < STEPS and f"terminated at step {done}: checkpoint saved; rerun with --resume" in err
    assert checkpoint_steps(out)[-1] == done  # the step it finished, on the 10-step interval or not
    assert not (out / "model").exists()
    assert os.listdir(cache), "no program in the compilation cache"

    assert main(argv(tmp_path / "full")) == 0
    want = [r["loss"] for r in metrics(tmp_path / "full")]
    assert len(want) == STEPS
    capsys.readouterr()
    assert main(argv(out, "--resume")) == 0
    assert [r["loss"] for r in metrics(out)] == want
    assert checkpoint_steps(out)[-1] == STEPS and (out / "model" / "config.json").exists()
    assert f"step {STEPS}: loss {want[-1]:.4f}; model written to {out / 'model'}" in capsys.readouterr().err


@pytest.mark.parametrize("option", [[], ["--no-compile-cache"]])
def test_compile_cache_option_parses(option, tmp_path):
    """--compile-cache and --no-compile-cache are finetune options (`COMPILES`): parsed, the run fails on the
    missing model (3), not on an unknown option (2)."""
    argv = ["finetune", "--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"), "--output",
            str(tmp_path / "o"), *(option or ["--compile-cache", str(tmp_path / "c")])]
    assert main(argv) == 3
