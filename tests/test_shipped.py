"""The shipped tiny code model: parity with transformers on trained weights, greedy generation, the tokenizer's
round trip on Python source, and the validation loss recorded at training time."""

from __future__ import annotations

import glob
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import phi_jax
from phi_jax.modeling.model import PhiForCausalLM
from tests.conftest import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef main():\n    "]
TRICKY = ["", "\n", "\t\tx = 1\r\n", "    \n\n  ", "s = 'caf\u00e9 \u2603 \U0001f600'\n", "<|endoftext|> is text here",
          "\x00\x7f\ufffd", "# -*- coding: utf-8 -*-\nprint(\"\u00fcber\")  # \u4e2d\u6587\n"]


@pytest.fixture(scope="module")
def path():
    return phi_jax.shipped_model_path()


@pytest.fixture(scope="module")
def metrics(path):
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def models(path):
    torch_model = transformers.PhiForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return PhiForCausalLM.from_pretrained(path), torch_model


@pytest.fixture(scope="module")
def valid_slice(path):
    from safetensors.numpy import load_file
    return load_file(os.path.join(path, "valid_slice.safetensors"))["input_ids"]


def test_shipped_directory_is_complete(path, metrics):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json",
                 "valid_slice.safetensors", "loss_curve.png"):
        assert os.path.isfile(os.path.join(path, name)), name
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "*")))
    assert size < 20e6, size
    assert metrics["python"].startswith("cpython 3.")
    assert metrics["train_files"] and metrics["valid_files"]
    assert not set(metrics["train_files"]) & set(metrics["valid_files"])
    assert metrics["steps"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["valid_loss"] < metrics["unigram_valid_loss"] - 1.0  # it learned more than token frequencies


@pytest.fixture(scope="module")
def slice_logits(models, valid_slice):
    """Both models' float32 logits `[R, T, V]` on the validation slice (one forward each)."""
    ours, theirs = models
    with torch.no_grad():
        ref = theirs(torch.from_numpy(valid_slice.astype(np.int64))).logits.numpy()
    return np.asarray(ours(jnp.asarray(valid_slice)).logits), ref


def _next_token_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    logits = logits[:, :-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(logz - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]))


def test_logits_match_transformers(slice_logits):
    out, ref = slice_logits
    assert rel_err(out, ref) <= 1e-4


def test_greedy_generation_matches_transformers(path, models):
    from tokenizers import Tokenizer

    ours, theirs = models
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    for prompt in PROMPTS:
        ids = np.asarray([tok.encode(prompt).ids], np.int32)
        out = ours.generate(ids, max_new_tokens=24)
        with torch.no_grad():
            ref = theirs.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=24, do_sample=False,
                                  pad_token_id=theirs.config.pad_token_id)
        np.testing.assert_array_equal(out[:, :ref.shape[1]], ref.numpy(), err_msg=prompt)
        assert (out[:, ref.shape[1]:] == theirs.config.pad_token_id).all()  # transformers stopped early only at eos


def _held_out_sources(metrics) -> dict[str, str]:
    """Held-out stdlib files of the running Python that exist here, plus phi_jax's own sources (never trained on)."""
    import sysconfig

    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    paths = [os.path.join(root, f) for f in metrics["valid_files"]]
    paths += sorted(glob.glob(os.path.join(REPO, "phi_jax", "**", "*.py"), recursive=True))
    sources = {}
    for p in paths:
        if os.path.isfile(p):
            with open(p, "rb") as f:
                sources[p] = f.read().decode("utf-8")
    return sources


def test_tokenizer_round_trips_python_source(path, metrics):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.token_to_id("<|endoftext|>")
    sources = _held_out_sources(metrics)
    assert len(sources) >= 10
    for name, text in list(sources.items()) + [(repr(s), s) for s in TRICKY]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, name
        assert hf.decode(hf(text, verbose=False)["input_ids"]) == text, name
        assert hf(text, verbose=False)["input_ids"] == ids, name


def test_validation_slice_is_the_held_out_files(path, metrics, valid_slice):
    """Where this Python's held-out files are the ones trained against (same digests), re-tokenizing them gives the
    stored slice: the slice is what the recipe says it is."""
    import hashlib
    import sysconfig

    from tokenizers import Tokenizer

    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    texts = []
    for name, digest in metrics["valid_files"].items():
        p = os.path.join(root, name)
        data = open(p, "rb").read() if os.path.isfile(p) else b""
        if hashlib.sha256(data).hexdigest() != digest:
            pytest.skip(f"{p} differs from the training machine's file")
        texts.append(data.decode("utf-8"))
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    flat = np.concatenate([np.append(e.ids, eos) for e in tok.encode_batch(texts)]).astype(np.int32)
    rows, seq = valid_slice.shape
    assert (rows, seq) == (metrics["slice"]["rows"], metrics["slice"]["seq_len"])
    np.testing.assert_array_equal(flat[:rows * seq].reshape(rows, seq), valid_slice)
    assert len(flat) == metrics["valid_tokens"]


def test_validation_loss_is_reproduced(slice_logits, metrics, valid_slice):
    recorded = metrics["slice"]["loss"]
    for logits in slice_logits:  # phi_jax, then transformers
        assert abs(_next_token_loss(logits, valid_slice) - recorded) <= 0.01 * recorded
    assert recorded < metrics["slice"]["unigram_loss"]


def test_cli_generate_defaults_to_the_shipped_model(capsys, path, models):
    """`phi-jax generate PROMPT` with no --model prints the shipped model's greedy completion."""
    from phi_jax.cli import main

    ours, _ = models
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ids = np.asarray([hf(PROMPTS[0])["input_ids"]], np.int32)
    new = [int(t) for t in ours.generate(ids, max_new_tokens=12)[0, ids.shape[1]:]]
    eos = ours.config.eos_token_id
    expected = hf.decode(new[:new.index(eos)] if eos in new else new, skip_special_tokens=True)
    assert main(["generate", PROMPTS[0], "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_model_card_is_what_its_generator_writes_and_its_commands_run_the_recorded_prompts(tmp_path):
    """docs/model_card.md comes from recipes/tiny_code_card.py (no figure typed by hand): regenerating it changes
    nothing, and each `phi-jax generate ...` line it shows passes the recorded prompt through bash unchanged."""
    import re
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "recipes"))
    try:
        import tiny_code_card
    finally:
        sys.path.pop(0)
    out = os.path.join(root, "docs", "model_card.md")
    with open(out) as f:
        committed = f.read()
    assert tiny_code_card.main(["--out", str(tmp_path / "docs" / "model_card.md")]) == 0
    with open(tmp_path / "docs" / "model_card.md") as f:
        png = os.path.relpath(os.path.join(root, "phi_jax", "shipped", "loss_curve.png"), tmp_path / "docs")
        assert f.read() == committed.replace("(../phi_jax/shipped/loss_curve.png)", f"({png})")
    with open(os.path.join(root, "phi_jax", "shipped", "metrics.json")) as f:
        prompts = [s["prompt"] for s in json.load(f)["samples"]]
    shown = re.findall(r"^`phi-jax generate (.*) --max-new-tokens \d+.*`$", committed, re.M)
    assert len(shown) == len(prompts)
    for quoted, prompt in zip(shown, prompts):
        assert subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True).stdout == prompt
