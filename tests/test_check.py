"""phi-jax check: the parity report passes on faithful checkpoints, fails on a corrupted one, names NaN/inf
weights, and states every tolerance it applies."""

from __future__ import annotations

import os

import numpy as np
import pytest

from phi_jax import convert
from phi_jax.cli import EXIT_FAIL, EXIT_OK, main
from phi_jax.parity import TOLERANCES, check_parity, relative_error


@pytest.fixture(autouse=True)
def _no_user_compile_cache(monkeypatch):
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")


def test_check_passes_on_hf_and_orbax(make_checkpoint, tmp_path, capsys):
    src, _ = make_checkpoint("phi2")
    report = check_parity(src)
    assert report.passed and report.max_rel_err <= 1e-4 and report.top1 == 1.0
    assert report.greedy_agree == report.greedy_total == 16
    assert "reads the directory itself" in report.title
    convert.convert(src, tmp_path / "orbax", to="orbax", progress=False)
    assert main(["check", "--model", str(tmp_path / "orbax")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Hugging Face conversion" in out and "result: PASS" in out and "greedy agreement           16/16" in out
    # every limit it applies is printed
    assert "max relative logit error <= 0.0001, top-1 agreement >= 100%, all greedy tokens equal" in out
    assert "no NaN/inf weight" in out


def test_check_states_the_bf16_tolerances(make_checkpoint, capsys):
    src, _ = make_checkpoint("phi1")
    assert main(["check", "--model", src, "--dtype", "bfloat16", "--new-tokens", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "tolerances (bfloat16): max relative logit error <= 0.05, top-1 agreement >= 95%" in out
    assert "(reported only)" in out and "result: PASS" in out
    assert TOLERANCES["bfloat16"].max_rel_err == 5e-2 and not TOLERANCES["bfloat16"].greedy_exact


def test_check_fails_when_the_two_sides_differ(make_checkpoint, monkeypatch, capsys):
    """phi_jax reading other weights than transformers (here: another checkpoint of the same shapes) fails."""
    from phi_jax.modeling.model import PhiForCausalLM
    src, _ = make_checkpoint("phi1")
    other, _ = make_checkpoint("phi1", seed=1)
    load = PhiForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(PhiForCausalLM, "from_pretrained", classmethod(lambda cls, path, **kw: load(cls, other, **kw)))
    report = check_parity(src)
    assert report.passed is False and report.max_rel_err > 1e-2 and report.top1 < 0.5
    assert main(["check", "--model", src]) == EXIT_FAIL
    out = capsys.readouterr().out
    assert "result: FAIL" in out and "(tolerance 0.0001)  FAIL" in out


def test_check_names_nonfinite_weights(make_checkpoint, capsys):
    from safetensors.numpy import load_file, save_file
    src, _ = make_checkpoint("phi1")
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.fc1.weight"][3, :2] = np.nan
    tensors["model.embed_tokens.weight"][0, 0] = np.inf
    save_file(tensors, path, metadata={"format": "pt"})
    assert main(["check", "--model", src]) == EXIT_FAIL
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.fc1.weight: 2 of 16384 values NaN/inf" in out
    assert "model.embed_tokens.weight: 1 of 6144 values NaN/inf" in out
    assert "non-finite weights         2 tensors  FAIL" in out and "result: FAIL" in out


def test_check_rejects_bad_arguments(make_checkpoint):
    src, _ = make_checkpoint("phi1")
    with pytest.raises(ValueError, match="dtype"):
        check_parity(src, dtype="float16")
    with pytest.raises(ValueError, match="seq_len"):
        check_parity(src, seq_len=0)


def test_relative_error_counts_real_positions_only():
    ref = np.array([[[0.0, 2.0], [1.0, 3.0]]])
    out = ref.copy()
    out[0, 1] += 100.0  # a padded position
    assert relative_error(out, ref, np.array([[True, False]])) == (0.0, 0.0)
    assert relative_error(out, ref)[0] > 10


def test_compare_names_an_unknown_dtype():
    """`compare` with a dtype that has no default tolerance: a ValueError naming it and the known ones, before
    either model runs (it was a bare KeyError after both forwards)."""
    from phi_jax.parity import compare
    with pytest.raises(ValueError, match=r"dtype='float16' has no default tolerance; expected one of \['bfloat16', "
                                         r"'float32'\]"):
        compare(None, None, np.ones((1, 4), np.int32), dtype="float16")
