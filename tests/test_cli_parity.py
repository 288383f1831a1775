"""The main job: `phi-jax parity` prints a passing report on a random transformers checkpoint; `--save DIR`
keeps that checkpoint, and the README's usage example runs as written on it."""

from __future__ import annotations

import os
import re

import pytest

from phi_jax.cli import EXIT_EXISTS, EXIT_FAIL, EXIT_OK, main

SMALL = ["parity", "--geometry", "small", "--layers", "1", "--vocab-size", "512", "--seq", "16", "--repeats", "2",
         "--new-tokens", "3"]


@pytest.fixture(autouse=True)
def _no_user_compile_cache(monkeypatch):
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")


def test_parity_command_reports_and_passes(capsys):
    assert main(SMALL) == EXIT_OK
    out = capsys.readouterr().out
    err = float(re.search(r"max relative logit error   (\S+)", out).group(1))
    assert err <= 1e-4
    assert "top-1 agreement            100.00%" in out and "greedy agreement           6/6 tokens" in out
    assert re.search(r"forward time, transformers [\d.]+ ms", out) and "torch threads" in out
    assert "result: PASS" in out


def test_parity_command_fails_on_impossible_tolerance(capsys):
    assert main([*SMALL, "--tolerance", "0"]) == EXIT_FAIL
    assert "result: FAIL" in capsys.readouterr().out


def _readme_python_example() -> str:
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return re.search(r"```python\n(.*?)```", readme[readme.index("## Usage"):], re.S).group(1)  # Usage's example


def test_readme_usage_example_runs_on_parity_save(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert main([*SMALL, "--save", "random-phi"]) == EXIT_OK
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat("random-phi").st_mode & 0o777 == 0o777 & ~mask  # as `mkdir` would create it (not mkdtemp's)
    assert "kept the checkpoint in random-phi" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir("random-phi"))
    assert not [n for n in os.listdir(".") if n.startswith(".random-phi.partial")]
    code = _readme_python_example()
    assert 'path = "random-phi"' in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert float(printed[-1]) <= 1e-4  # its last line: the relative logit error against transformers
    assert main([*SMALL, "--save", "random-phi"]) == EXIT_EXISTS  # never overwrites
