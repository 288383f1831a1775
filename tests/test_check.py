"""phi-jax check: the parity report passes on faithful checkpoints and fails on a corrupted one."""

from __future__ import annotations

import pytest

from phi_jax import convert
from phi_jax.check import check_parity
from phi_jax.cli import main


def test_check_passes_on_hf_and_orbax(make_checkpoint, tmp_path, capsys):
    src, _ = make_checkpoint("phi2")
    report = check_parity(src)
    assert report.passed and report.max_rel_err <= 1e-4 and report.top1 == 1.0
    assert report.greedy_agree == report.greedy_total == 16
    convert.hf_to_orbax(src, tmp_path / "orbax")
    assert main(["check", "--model", str(tmp_path / "orbax")]) == 0
    out = capsys.readouterr().out
    assert "orbax layout" in out and "result: PASS" in out and "greedy agreement           16/16" in out


def test_check_fails_when_the_two_sides_differ(make_checkpoint, tmp_path, monkeypatch):
    """The reference of an Orbax directory is built by converting it to HF; swapping q and k of layer 0 on
    that path (same shapes, so everything loads) must make the check fail."""
    src, _ = make_checkpoint("phi1")
    convert.hf_to_orbax(src, tmp_path / "orbax")
    get = convert.OrbaxSource.get
    swap = {"model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.k_proj.weight": "model.layers.0.self_attn.q_proj.weight"}
    monkeypatch.setattr(convert.OrbaxSource, "get", lambda self, key, rows=None: get(self, swap.get(key, key), rows))
    report = check_parity(tmp_path / "orbax")
    assert report.passed is False and report.max_rel_err > 1e-2


def test_check_reports_failure(make_checkpoint, monkeypatch, capsys):
    src, _ = make_checkpoint("phi1")
    import phi_jax.check as check_mod
    monkeypatch.setitem(check_mod.TOLERANCES, "float32", (1e-9, 1.0, True))  # stricter than float32 can meet
    assert main(["check", "--model", src]) == 1
    out = capsys.readouterr().out
    assert "result: FAIL" in out and "FAIL" in out.splitlines()[2]
    with pytest.raises(ValueError, match="dtype"):
        check_parity(src, dtype="float16")
