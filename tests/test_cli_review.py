"""`phi-jax` commands given broken or unusual input: one `error:` line naming the culprit and a non-zero exit
status, never a traceback; nothing half-written or clobbered (the input file, a source directory, an empty
run directory) after a failure."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from phi_jax.cli import EXIT_EXISTS, EXIT_OK, EXIT_OS, EXIT_USAGE, exit_code, main, run_command
from phi_jax.io.jsonl import read_jsonl
from test_cli import _no_user_compile_cache, _one_error_line, model_dir  # noqa: F401  (fixtures)
from train_fixtures import TEXT, tiny_run, write_jsonl


def _generate_file(model_dir, tmp_path, *extra) -> list[str]:
    return ["generate", "--model", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output",
            str(tmp_path / "c.jsonl"), "--max-new-tokens", "2", "--no-progress", *extra]


# ---- JSON-lines input (generate --input, finetune --data) ---------------------------------------------------

def test_jsonl_reader_skips_a_byte_order_mark(tmp_path):
    """Notepad and other editors start a UTF-8 file with a BOM; it is skipped like a CRLF line end."""
    with open(tmp_path / "p.jsonl", "wb") as f:
        f.write(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n"b"\r\n')
    got = [(n, v) for n, _, v in read_jsonl(str(tmp_path / "p.jsonl"), lambda n: f"line {n}")]
    assert got == [(1, {"prompt": "a"}), (3, "b")]


@pytest.mark.parametrize("line, needle", [('{"prompt": "a", "n": 1' + "0" * 5000 + "}", "digits"),
                                          ('{"prompt": "a", "score": NaN}', "NaN is not a JSON value"),
                                          ('{"prompt": "\\ud800"}', "surrogate"),
                                          ('{"prompt": "a", "x": ["\\udc00"]}', "surrogate")])
def test_generate_jsonl_unreadable_values_name_the_line(model_dir, tmp_path, capsys, line, needle):
    """An integer Python will not parse (> 4300 digits), a lone UTF-16 surrogate (no character: the tokenizer
    and the UTF-8 output refuse it): exit 2 naming the line, before the model is read; no partial file."""
    write_jsonl(tmp_path / "p.jsonl", ['"fine"', line])
    assert main(_generate_file(model_dir, tmp_path)) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "p.jsonl line 2", needle)
    assert not os.path.exists(tmp_path / "c.jsonl.partial")


def test_finetune_data_with_a_lone_surrogate_names_the_line(make_checkpoint, tmp_path, capsys):
    path, _ = tiny_run(make_checkpoint, tmp_path)
    capsys.readouterr()  # transformers' progress bars
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": TEXT}, '{"text": "\\ud800"}'])
    assert main(["finetune", "--model", path, "--data", data, "--output", str(tmp_path / "run"), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress"]) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "bad.jsonl:2", "surrogate")


@pytest.mark.parametrize("key", ["completion", "new_tokens", "stopped"])
def test_generate_jsonl_result_keys_are_reserved(model_dir, tmp_path, capsys, key):
    """As "line" is: the output's value would silently replace the input's."""
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", key: "mine"}])
    assert main(_generate_file(model_dir, tmp_path)) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "p.jsonl line 1", f'"{key}"')


# ---- generate --output ----------------------------------------------------------------------------------------

def test_generate_output_that_is_a_directory_or_the_input_fails_at_once(model_dir, tmp_path, capsys):
    """Before: a directory failed after every prompt was decoded, naming a temporary file; the input file itself
    (or a link to it) was replaced by the completions."""
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with open(tmp_path / "p.jsonl") as f:
        before = f.read()
    os.symlink(tmp_path / "p.jsonl", tmp_path / "link.jsonl")
    (tmp_path / "out").mkdir()
    for output, needle in ((tmp_path / "out", "is a directory"), (tmp_path / "p.jsonl", "is the --input file"),
                           (tmp_path / "link.jsonl", "is the --input file")):
        argv = _generate_file(model_dir, tmp_path)
        argv[argv.index("--output") + 1] = str(output)
        assert main(argv) == EXIT_USAGE, output
        _one_error_line(capsys.readouterr().err, str(output), needle)
        assert not os.path.exists(str(output) + ".partial")
    with open(tmp_path / "p.jsonl") as f:
        assert f.read() == before


# ---- checkpoints --------------------------------------------------------------------------------------------

def test_config_json_that_is_not_utf8_names_it(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    with open(bad / "config.json", "wb") as f:
        f.write(b'\xff\xfe{"model_type": "phi"}')
    for argv in (["generate", "--model", str(bad), "hi"], ["check", "--model", str(bad)],
                 ["convert", "hf-to-orbax", str(bad), str(tmp_path / "o"), "--no-progress"]):
        assert main(argv) == EXIT_USAGE, argv
        _one_error_line(capsys.readouterr().err, "config.json", "UTF-8")


def test_corrupt_orbax_metadata_is_exit_2(model_dir, tmp_path, capsys):
    """Orbax logs unreadable metadata and returns None, which failed an assertion deep in flax (exit 70); what it
    logged is now the end of the one error line, not warnings printed before it."""
    orbax_dir = tmp_path / "orbax"
    assert main(["convert", "hf-to-orbax", model_dir, str(orbax_dir), "--no-progress"]) == EXIT_OK
    with open(orbax_dir / "params" / "state" / "_METADATA", "w") as f:
        f.write("garbage")
    capsys.readouterr()
    for argv in (["generate", "--model", str(orbax_dir), "hi"],
                 ["convert", "orbax-to-hf", str(orbax_dir), str(tmp_path / "hf"), "--no-progress"]):
        assert main(argv) == EXIT_USAGE, argv
        _one_error_line(capsys.readouterr().err, "error: cannot read Orbax metadata", "Expecting value")
    assert not os.path.exists(tmp_path / "hf")


# ---- convert --------------------------------------------------------------------------------------------------

def test_convert_config_option_that_is_not_json_names_it(model_dir, tmp_path, capsys):
    for content in (b"{not json", b"\xff\xfe"):
        with open(tmp_path / "cfg.json", "wb") as f:
            f.write(content)
        assert main(["convert", "legacy-to-hf", model_dir, str(tmp_path / "o"), "--config",
                     str(tmp_path / "cfg.json"), "--no-progress"]) == EXIT_USAGE
        _one_error_line(capsys.readouterr().err, "--config", "cfg.json")


def test_convert_overwrite_refuses_a_destination_holding_the_source(model_dir, tmp_path, capsys):
    """Before: DST was replaced by the new directory and SRC, inside the old one, was deleted with it."""
    src = tmp_path / "runs" / "src"
    shutil.copytree(model_dir, src)
    for dst in (tmp_path / "runs", tmp_path):
        assert main(["convert", "hf-to-orbax", str(src), str(dst), "--overwrite", "--no-progress"]) == EXIT_USAGE
        _one_error_line(capsys.readouterr().err, "inside", "overwriting would replace (deleting the source)")
    assert sorted(os.listdir(src)) == sorted(os.listdir(model_dir))
    assert main(["convert", "hf-to-orbax", str(src), str(src / "orbax"), "--overwrite", "--no-progress"]) == EXIT_OK
    capsys.readouterr()


# ---- check, parity --------------------------------------------------------------------------------------------

def test_check_and_parity_option_values_name_the_option(model_dir, capsys):
    """numpy's "expected non-negative integer" after the model was read; torch's RuntimeError (exit 70)."""
    for argv, needle in ((["check", "--model", model_dir, "--seed", "-1"], "--seed"),
                         (["parity", "--geometry", "small", "--layers", "1", "--vocab-size", "300", "--threads", "-2"],
                          "--threads"),
                         (["parity", "--geometry", "small", "--layers", "1", "--vocab-size", "300", "--tolerance",
                           "-1"], "--tolerance")):
        assert main(argv) == EXIT_USAGE, argv
        _one_error_line(capsys.readouterr().err, needle)


def test_out_of_memory_is_one_line_not_a_bug_report(capsys):
    import jax

    def run(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 110551525332 bytes.")

    assert exit_code(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: x"))[0] == EXIT_OS
    assert exit_code(jax.errors.JaxRuntimeError("INTERNAL: x")) is None  # other XLA failures stay bugs
    assert run_command(run, object()) == EXIT_OS
    _one_error_line(capsys.readouterr().err, "out of memory", "110551525332 bytes")


# ---- finetune -------------------------------------------------------------------------------------------------

@pytest.fixture
def run_files(make_checkpoint, tmp_path, capsys):
    files = tiny_run(make_checkpoint, tmp_path)
    capsys.readouterr()  # transformers' progress bars
    return files


def _finetune(run_files, output, *extra) -> list[str]:
    path, data = run_files
    return ["finetune", "--model", path, "--data", data, "--output", str(output), "--steps", "1", "--batch-size",
            "2", "--seq-len", "16", "--no-progress", *extra]


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", "-1"), ("--batch-size", "0"),
                                           ("--seq-len", "1"), ("--seq-len", "0"), ("--accum-steps", "0"),
                                           ("--lr", "-1"), ("--lr", "nan"), ("--warmup-steps", "-1"),
                                           ("--weight-decay", "-0.1"), ("--max-grad-norm", "inf"),
                                           ("--keep", "0"), ("--save-every", "0"), ("--seed", "-1")])
def test_finetune_option_values_fail_at_once_naming_the_option(run_files, tmp_path, capsys, option, value):
    """Before: --steps 0 exported the untouched model, --seq-len 1 trained on no targets (loss 0), --lr -1 or nan
    trained, --keep 0 kept no checkpoint to resume from; --batch-size 0, --accum-steps 0: tracebacks."""
    out = tmp_path / "run"
    assert main(_finetune(run_files, out, option, value)) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, option)
    assert not out.exists()


def test_finetune_failure_leaves_no_empty_run_directory(run_files, tmp_path, capsys):
    path, data = run_files
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    out = tmp_path / "runs" / "new" / "run"
    argv = _finetune(run_files, out)
    argv[argv.index("--data") + 1] = str(tmp_path / "empty.jsonl")
    assert main(argv) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "empty.jsonl:1")
    assert not (tmp_path / "runs").exists()  # every directory the run made, gone

    bad = tmp_path / "bad"  # weights cut short: fails after checkpoints/ is made
    shutil.copytree(path, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(10000)
    (tmp_path / "kept").mkdir()
    argv = _finetune((str(bad), data), tmp_path / "kept" / "run")
    assert main(argv) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "model.safetensors")
    assert os.listdir(tmp_path / "kept") == []  # the existing parent stays; what the run made goes

    with open(tmp_path / "file", "w") as f:
        f.write("x")
    assert main(_finetune(run_files, tmp_path / "file")) == EXIT_EXISTS
    _one_error_line(capsys.readouterr().err, "--output", "is a file")


def test_finetune_corrupt_tokenizer_names_it(run_files, tmp_path, capsys):
    path, data = run_files
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    with open(bad / "tokenizer.json", "w") as f:
        f.write('{"version": "1.0", "truncation"')
    assert main(_finetune((str(bad), data), tmp_path / "run")) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "tokenizer.json")
    assert not (tmp_path / "run").exists()
    with open(bad / "tokenizer.json", "w") as f:
        json.dump({}, f)
    assert main(_finetune((str(bad), data), tmp_path / "run")) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "tokenizer.json")


def test_bin_checkpoint_without_torch_is_the_missing_extra_exit(make_checkpoint, tmp_path, monkeypatch, capsys):
    """A pytorch_model.bin needs torch: exit 6 naming the file and the extra (was a plain ImportError: exit 70)."""
    from phi_jax.cli import EXIT_MISSING_EXTRA
    path, _ = make_checkpoint("phi1", fmt="bin")
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if it were not installed
    assert main(["convert", "hf-to-orbax", path, str(tmp_path / "o"), "--no-progress"]) == EXIT_MISSING_EXTRA
    _one_error_line(capsys.readouterr().err, "pytorch_model.bin", "phi_jax[torch]")
