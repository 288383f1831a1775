"""The main job: `phi-jax parity` prints a passing report on a random transformers checkpoint."""

from __future__ import annotations

import re

from phi_jax.cli import main


def test_parity_command_reports_and_passes(capsys):
    rc = main(["parity", "--geometry", "small", "--layers", "1", "--vocab-size", "256", "--seq", "16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    err = float(re.search(r"max relative logit error : (\S+)", out).group(1))
    assert err <= 1e-4
    assert "top-1 agreement          : 100.00%" in out
    assert re.search(r"forward time, transformers: [\d.]+ ms", out)
    assert "parity: PASS" in out


def test_parity_command_fails_on_impossible_tolerance(capsys):
    rc = main(["parity", "--geometry", "small", "--layers", "1", "--vocab-size", "256", "--seq", "16",
               "--tolerance", "0"])
    assert rc == 1
    assert "parity: FAIL" in capsys.readouterr().out
