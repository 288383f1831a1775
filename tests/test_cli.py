"""`phi-jax` commands: one error policy (one `error:` line, shared exit statuses), no network, the tokenizer
from tokenizer.json, the streamed single prompt and the batched JSONL mode (order, resume, bad lines)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import phi_jax
from phi_jax.cli import EXIT_EXISTS, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, exit_code, main
from phi_jax.parity import write_tokenizer

VOCAB = 320  # byte-level BPE: 256 bytes + merges


@pytest.fixture(autouse=True)
def _no_user_compile_cache(monkeypatch):
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")  # tests never write to ~/.cache


@pytest.fixture
def model_dir(make_checkpoint):
    d, _ = make_checkpoint("phi1", vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    write_tokenizer(d, VOCAB)
    return d


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_exit_code_table():
    assert exit_code(ValueError("x")) == (EXIT_USAGE, "x")
    assert exit_code(FileNotFoundError("gone")) == (EXIT_NOT_FOUND, "gone")
    assert exit_code(FileExistsError("there")) == (EXIT_EXISTS, "there")
    assert exit_code(ModuleNotFoundError("no torch", name="torch"))[1].endswith("pip install 'phi_jax[torch]'")
    assert exit_code(KeyError("bug")) is None  # a bug: traceback, not a one-liner


@pytest.mark.parametrize("command", [[], ["generate"], ["check"], ["parity"], ["convert"], ["convert", "orbax-to-hf"]])
def test_help_of_every_command(command, capsys):
    assert main([*command, "--help"]) == EXIT_OK
    assert "usage: phi-jax" in capsys.readouterr().out


def test_missing_paths_fail_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    """No command reaches for a model hub: a missing directory is exit 3 and one line naming it."""
    monkeypatch.chdir(tmp_path)
    for argv in (["generate", "--model", "nope", "hi"], ["check", "--model", "nope"],
                 ["convert", "hf-to-orbax", "nope", "out", "--no-progress"]):
        assert main(argv) == EXIT_NOT_FOUND, argv
        _one_error_line(capsys.readouterr().err, "nope")


def test_usage_errors_are_exit_2(model_dir, capsys):
    for argv in (["generate", "--model", model_dir], ["generate", "--model", model_dir, "--bogus", "x"],
                 ["generate", "--model", model_dir, "hi", "--max-new-tokens", "0"],
                 ["generate", "--model", model_dir, "--input", "p.jsonl"], ["check", "--model", model_dir,
                                                                             "--dtype", "float64"]):
        assert main(argv) == EXIT_USAGE, argv
        _one_error_line(capsys.readouterr().err)


def test_corrupt_weights_and_config_are_exit_2_in_every_command(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), "rb") as f:
            data = f.read()
        with open(bad / name, "wb") as f:
            f.write(data[:len(data) // 2] if name == "model.safetensors" else data)
    for argv in (["generate", "--model", str(bad), "hi"], ["check", "--model", str(bad)],
                 ["convert", "hf-to-orbax", str(bad), str(tmp_path / "o"), "--no-progress"]):
        assert main(argv) == EXIT_USAGE, argv
        _one_error_line(capsys.readouterr().err, "model.safetensors")
    with open(bad / "config.json", "w") as f:
        f.write("{not json")
    assert main(["generate", "--model", str(bad), "hi"]) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err)


def test_output_exists_is_exit_4(model_dir, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["convert", "hf-to-orbax", model_dir, str(tmp_path / "o"), "--no-progress"]) == EXIT_EXISTS
    _one_error_line(capsys.readouterr().err)


def test_tokenizer_missing_names_the_option(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(model_dir):
        if not name.startswith("tokenizer"):
            os.link(os.path.join(model_dir, name), bare / name)
    assert main(["generate", "--model", str(bare), "hi"]) == EXIT_NOT_FOUND
    _one_error_line(capsys.readouterr().err, "tokenizer.json", "--tokenizer")
    tok_file = os.path.join(model_dir, "tokenizer.json")
    for tok in (tok_file, model_dir):
        assert main(["generate", "--model", str(bare), "--tokenizer", tok, "--max-new-tokens", "2", "hi"]) == EXIT_OK
    capsys.readouterr()
    with open(tmp_path / "junk.json", "w") as f:
        f.write("{}")
    assert main(["generate", "--model", str(bare), "--tokenizer", str(tmp_path / "junk.json"), "hi"]) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "junk.json")


def _greedy(model_dir, prompt: str, new: int) -> tuple[list[int], list[int]]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids = tok.encode(prompt).ids
    model = phi_jax.PhiForCausalLM.from_pretrained(model_dir)
    return ids, model.generate(np.asarray([ids]), max_new_tokens=new, eos_token_id=[])[0, len(ids):].tolist()


def test_generate_streams_the_greedy_completion_and_a_separate_stats_line(model_dir, capsys):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    prompt = "def fibonacci(n):"
    ids, new = _greedy(model_dir, prompt, 6)
    assert 0 not in new  # no eos in these 6 tokens (eos is id 0)
    assert main(["generate", "--model", model_dir, "--max-new-tokens", "6", prompt]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == tok.decode(new) + "\n"
    (stats,) = err.strip().splitlines()
    assert stats.startswith(f"prefill: {len(ids)} tokens") and "decode: 5 tokens" in stats
    assert "stopped at --max-new-tokens 6" in stats and "eos" not in stats

    # the same prompt with its k-th new token made the eos: k tokens, "stopped at eos"
    k = next(i for i in range(1, 6) if new[i] not in new[:i])
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = new[k]
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert main(["generate", "--model", model_dir, "--max-new-tokens", "6", prompt]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == tok.decode(new[:k]) + "\n"
    assert err.strip().endswith(f"{k} new tokens, stopped at eos")


def _write_lines(path, lines) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


PROMPTS = ['{"prompt": "def add(a, b):", "id": "first"}', '"print(1)"', "",
           json.dumps({"prompt": "The quick brown fox jumps over the lazy dog. " * 2}), '{"prompt": "x = 1"}',
           '{"prompt": "import numpy as np"}']


def test_generate_jsonl_batches_in_input_order(model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    _write_lines(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "c.jsonl"
    assert main(["generate", "--model", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output", str(out),
                 "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]) == EXIT_OK
    assert "wrote" in capsys.readouterr().err
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert [r["line"] for r in rows] == [1, 2, 4, 5, 6]  # input order; the blank line 3 is skipped
    assert rows[0]["id"] == "first" and rows[1]["prompt"] == "print(1)"
    model = phi_jax.PhiForCausalLM.from_pretrained(model_dir)
    for r in rows:  # each equals its prompt decoded alone (padding never changes real positions)
        ids = tok.encode(r["prompt"]).ids
        alone = model.generate(np.asarray([ids]), max_new_tokens=4)[0, len(ids):].tolist()
        cut = alone.index(0) if 0 in alone else len(alone)
        assert r["completion"] == tok.decode(alone[:cut]) and r["new_tokens"] == cut
        assert r["stopped"] == ("eos" if cut < 4 else "length")
    assert not os.path.exists(str(out) + ".partial")
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # as `open` would create it (not mkstemp's 0o600)


def test_generate_jsonl_resumes_without_redoing_finished_prompts(model_dir, tmp_path, monkeypatch, capsys):
    from phi_jax.generation import generate as gen
    _write_lines(tmp_path / "p.jsonl", PROMPTS)
    argv = ["generate", "--model", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output",
            str(tmp_path / "c.jsonl"), "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"]
    real, rows_seen = gen.generate, []

    def interrupted_after_one_batch(model, ids, *a, **k):
        if rows_seen:
            raise KeyboardInterrupt
        rows_seen.append(len(ids))
        return real(model, ids, *a, **k)

    monkeypatch.setattr(gen, "generate", interrupted_after_one_batch)
    assert main(argv) == 130
    _one_error_line(capsys.readouterr().err, "interrupted")
    assert not os.path.exists(tmp_path / "c.jsonl")
    with open(tmp_path / "c.jsonl.partial") as f:
        first = [json.loads(line) for line in f]
    assert len(first) == 3 and "settings" in first[0]  # the settings, then the first batch of 2
    other = [a if a != "3" else "4" for a in argv]  # other --max-new-tokens: not the same run
    assert main(other) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "c.jsonl.partial", "max_new_tokens")

    calls = []
    monkeypatch.setattr(gen, "generate", lambda model, ids, *a, **k: calls.append(len(ids)) or real(model, ids, *a, **k))
    assert main(argv) == EXIT_OK
    assert sum(calls) <= 4 and len(calls) == 2  # the 3 remaining prompts only: one batch of 2, one of 1
    assert "3 generated now, 2 from an earlier run" in capsys.readouterr().err
    with open(tmp_path / "c.jsonl") as f:
        resumed = [json.loads(line) for line in f]
    monkeypatch.setattr(gen, "generate", real)
    os.remove(tmp_path / "c.jsonl")
    assert main(argv) == EXIT_OK
    with open(tmp_path / "c.jsonl") as f:
        fresh = [json.loads(line) for line in f]
    assert resumed == fresh and [r["line"] for r in fresh] == [1, 2, 4, 5, 6]


@pytest.mark.parametrize("line, needle", [("{not json", "not valid JSON"), ('{"text": "x"}', '"prompt"'),
                                          ('["a"]', '"prompt"'), ('{"prompt": ""}', "no tokens")])
def test_generate_jsonl_bad_line_names_its_number(model_dir, tmp_path, capsys, line, needle):
    _write_lines(tmp_path / "p.jsonl", ['"fine"', "", line])
    assert main(["generate", "--model", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output",
                 str(tmp_path / "c.jsonl")]) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "p.jsonl line 3", needle)


def test_relative_paths_from_another_directory(model_dir, tmp_path, monkeypatch, capsys):
    import shutil
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(model_dir, work / "m")
    monkeypatch.chdir(work)
    _write_lines("p.jsonl", ['"def f(x):"'])
    assert main(["generate", "--model", "m", "--input", "p.jsonl", "--output", "c.jsonl", "--max-new-tokens", "2",
                 "--no-progress"]) == EXIT_OK
    assert os.path.isfile(work / "c.jsonl")
    assert main(["convert", "hf-to-orbax", "m", "o", "--no-progress"]) == EXIT_OK
    assert main(["generate", "--model", "o", "--tokenizer", "m/tokenizer.json", "--max-new-tokens", "2", "x"]) == EXIT_OK
    capsys.readouterr()
