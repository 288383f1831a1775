"""`phi-jax generate --input`: batches per length bucket, the progress bar, and what a resume may reuse
(a partial file without settings, a sampled run cut inside a batch, another --batch-size)."""

from __future__ import annotations

import json
import os
import re

from phi_jax.cli import EXIT_OK, EXIT_USAGE, main
from test_cli import _no_user_compile_cache, _one_error_line, model_dir  # noqa: F401  (fixtures)

SHORT = ["def f(x):", "x = 1", "print(2)", "import os"]  # bucket 16
LONG = ["The quick brown fox jumps over the lazy dog, again and again. " * 2 + str(i) for i in range(3)]  # > 16


def _write_prompts(path, prompts) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)


def _read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _argv(model_dir, tmp_path, *extra) -> list[str]:
    return ["generate", "--model", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output",
            str(tmp_path / "c.jsonl"), *extra]


def _spy_batches(monkeypatch, interrupt_after: int | None = None) -> list[list[int]]:
    """Records the line numbers of every batch decoded; KeyboardInterrupt before batch `interrupt_after + 1`."""
    from phi_jax.cli import generate as cli
    real, seen = getattr(cli._generate_batch, "__wrapped__", cli._generate_batch), []

    def spy(model, batch, *a, **k):
        if interrupt_after is not None and len(seen) == interrupt_after:
            raise KeyboardInterrupt
        seen.append([p["line"] for p in batch])
        return real(model, batch, *a, **k)

    spy.__wrapped__ = real  # a second spy wraps the real function, not this one
    monkeypatch.setattr(cli, "_generate_batch", spy)
    return seen


def test_prompts_share_a_batch_only_within_their_length_bucket(model_dir, tmp_path, monkeypatch, capsys):
    from tokenizers import Tokenizer

    from phi_jax.generation import generate as gen
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    assert all(len(tok.encode(p).ids) <= 16 for p in SHORT) and all(len(tok.encode(p).ids) > 16 for p in LONG)
    prompts = [SHORT[0], LONG[0], SHORT[1], LONG[1], SHORT[2], LONG[2], SHORT[3]]  # lines 1..7, interleaved
    _write_prompts(tmp_path / "p.jsonl", prompts)
    batches = _spy_batches(monkeypatch)
    real, widths = gen.generate, []
    monkeypatch.setattr(gen, "generate", lambda m, ids, *a, **k: widths.append(ids.shape) or real(m, ids, *a, **k))
    assert main(_argv(model_dir, tmp_path, "--batch-size", "2", "--max-new-tokens", "3", "--no-progress")) == EXIT_OK
    capsys.readouterr()
    # short lines 1,3,5,7 in bucket 16 first, then long lines 2,4,6; in line order inside a bucket, 2 at a time
    assert batches == [[1, 3], [5, 7], [2, 4], [6]]
    short_width = max(len(tok.encode(p).ids) for p in SHORT)
    assert widths[0][1] <= short_width and widths[1][1] <= short_width  # no long prompt widened a short batch
    assert all(w[1] > 16 for w in widths[2:]) and widths[3][0] == 1
    rows = _read(tmp_path / "c.jsonl")
    assert [r["line"] for r in rows] == list(range(1, 8)) and [r["prompt"] for r in rows] == prompts


def test_progress_bar_counts_prompts_and_shows_tokens_per_s(model_dir, tmp_path, capsys):
    """Shown unless --no-progress (as finetune's), even when stderr is not a terminal."""
    _write_prompts(tmp_path / "p.jsonl", SHORT[:3])
    assert main(_argv(model_dir, tmp_path, "--batch-size", "2", "--max-new-tokens", "3")) == EXIT_OK
    err = capsys.readouterr().err
    assert re.search(r"0/3 \[", err), err  # the bar's first render
    assert re.search(r"3/3 \[[^\]]*, \d+\.\d tokens/s\]", err), err  # the last one, with tokens/s
    os.remove(tmp_path / "c.jsonl")
    assert main(_argv(model_dir, tmp_path, "--max-new-tokens", "3", "--no-progress")) == EXIT_OK
    err = capsys.readouterr().err
    assert "3/3" not in err and "wrote" in err


def test_results_without_a_settings_line_are_refused(model_dir, tmp_path, capsys):
    """They cannot be matched to the options of this run: an error naming the file, which is left as it was."""
    _write_prompts(tmp_path / "p.jsonl", SHORT[:2])
    partial = tmp_path / "c.jsonl.partial"
    stale = json.dumps({"line": 1, "prompt": SHORT[0], "completion": "STALE", "new_tokens": 1, "stopped": "eos"})
    for first in ('{"settings": {"seed"', '{"line": 0}'):  # the settings line cut short, or missing
        with open(partial, "w") as f:
            f.write(first + "\n" + stale + "\n")
        assert main(_argv(model_dir, tmp_path, "--max-new-tokens", "2", "--no-progress")) == EXIT_USAGE
        _one_error_line(capsys.readouterr().err, "c.jsonl.partial", "no settings line", "delete it")
        assert partial.read_text() == first + "\n" + stale + "\n" and not os.path.exists(tmp_path / "c.jsonl")
    with open(partial, "w") as f:  # nothing that could be reused: a fresh start
        f.write('{"settings": {"se\n')
    assert main(_argv(model_dir, tmp_path, "--max-new-tokens", "2", "--no-progress")) == EXIT_OK
    assert "2 generated now, 0 from an earlier run" in capsys.readouterr().err
    assert "STALE" not in (tmp_path / "c.jsonl").read_text() and not partial.exists()


def test_resumed_sampled_run_cut_inside_a_batch_equals_the_uninterrupted_run(model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    _write_prompts(tmp_path / "p.jsonl", SHORT + ["for i in range(3):", "while True:"])  # 6 prompts, one bucket
    argv = _argv(model_dir, tmp_path, "--batch-size", "2", "--max-new-tokens", "8", "--do-sample",
                 "--temperature", "1.5", "--seed", "7", "--no-progress")
    assert main(argv) == EXIT_OK
    fresh = _read(tmp_path / "c.jsonl")
    os.remove(tmp_path / "c.jsonl")

    batches = _spy_batches(monkeypatch, interrupt_after=2)
    assert main(argv) == 130
    partial = tmp_path / "c.jsonl.partial"
    lines = partial.read_text().splitlines()
    assert batches == [[1, 2], [3, 4]] and len(lines) == 5  # the settings, then 4 results
    partial.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # line 4's result cut short
    capsys.readouterr()

    batches = _spy_batches(monkeypatch)
    assert main(argv) == EXIT_OK
    assert batches == [[3, 4], [5, 6]]  # the cut batch is decoded whole again: same rows, same seed
    assert "3 generated now, 3 from an earlier run" in capsys.readouterr().err
    assert _read(tmp_path / "c.jsonl") == fresh


def test_batch_size_may_change_on_resume_sampled_or_greedy(model_dir, tmp_path, monkeypatch, capsys):
    """Each prompt draws with its own key (--seed + its line number), so a sampled completion does not depend on
    its batch mates: the same outputs with batches of 1 and of 4, and a run interrupted with --batch-size 2
    resumes with --batch-size 3 (sampled or greedy) and ends equal to a fresh run."""
    _write_prompts(tmp_path / "p.jsonl", SHORT)
    alone = _argv(model_dir, tmp_path, "--batch-size", "1", "--max-new-tokens", "6", "--no-progress", "--do-sample",
                  "--temperature", "1.5")
    assert main(alone) == EXIT_OK
    by_one = _read(tmp_path / "c.jsonl")
    os.remove(tmp_path / "c.jsonl")
    assert main([a if a != "1" else "4" for a in alone]) == EXIT_OK
    assert _read(tmp_path / "c.jsonl") == by_one
    assert len({r["completion"] for r in by_one}) > 1
    os.remove(tmp_path / "c.jsonl")
    for mode in (["--do-sample"], []):
        argv = _argv(model_dir, tmp_path, "--batch-size", "2", "--max-new-tokens", "3", "--no-progress", *mode)
        assert main(argv) == EXIT_OK
        fresh = _read(tmp_path / "c.jsonl")
        os.remove(tmp_path / "c.jsonl")
        _spy_batches(monkeypatch, interrupt_after=1)
        assert main(argv) == 130
        capsys.readouterr()
        batches = _spy_batches(monkeypatch)
        assert main([a if a != "2" else "3" for a in argv]) == EXIT_OK  # --batch-size 3
        assert batches == [[1, 2, 3], [4]]  # batches of 3 over the input; [1, 2, 3] holds unfinished 3
        capsys.readouterr()
        assert _read(tmp_path / "c.jsonl") == fresh
        os.remove(tmp_path / "c.jsonl")


def test_mesh_gives_the_completions_of_one_device(model_dir, tmp_path, capsys):
    """`--mesh` loads the model onto 8 (simulated) devices in a subprocess: the same completions, sampled, as one
    device; a mesh the devices cannot make, or a bad entry, is one error line before anything is read."""
    from conftest import run_on_cpu_devices
    _write_prompts(tmp_path / "p.jsonl", SHORT + LONG)
    sampled = ("--max-new-tokens", "4", "--do-sample", "--seed", "3", "--no-progress")
    assert main(_argv(model_dir, tmp_path, *sampled)) == EXIT_OK
    one = _read(tmp_path / "c.jsonl")
    os.rename(tmp_path / "c.jsonl", tmp_path / "one.jsonl")
    run_on_cpu_devices(["-m", "phi_jax.cli", *_argv(model_dir, tmp_path, *sampled, "--mesh", "data=2,fsdp=2,tensor=2")])
    assert _read(tmp_path / "c.jsonl") == one
    capsys.readouterr()
    for mesh, needle in (("data=2,fsdp=2,tensor=2", "spans 8 devices, but there are 1"), ("model=2", "bad mesh entry")):
        assert main(_argv(model_dir, tmp_path, "--mesh", mesh)) == EXIT_USAGE
        _one_error_line(capsys.readouterr().err, needle)


def test_an_existing_output_is_replaced_only_with_overwrite(model_dir, tmp_path, capsys):
    """A finished run's completions are not lost to a rerun: exit 4 naming the file, which is left as it was."""
    from phi_jax.cli import EXIT_EXISTS
    _write_prompts(tmp_path / "p.jsonl", SHORT[:1])
    out = tmp_path / "c.jsonl"
    out.write_text("KEEP\n")
    assert main(_argv(model_dir, tmp_path, "--max-new-tokens", "2", "--no-progress")) == EXIT_EXISTS
    _one_error_line(capsys.readouterr().err, "c.jsonl", "exists", "--overwrite")
    assert out.read_text() == "KEEP\n"
    assert main(_argv(model_dir, tmp_path, "--max-new-tokens", "2", "--no-progress", "--overwrite")) == EXIT_OK
    assert [r["line"] for r in _read(out)] == [1] and "wrote" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "x", "--overwrite"]) == EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "--overwrite goes with --output")


def test_truncation_or_padding_recorded_in_tokenizer_json_is_not_applied(model_dir, tmp_path, capsys):
    """A tokenizer.json saved with truncation or padding on (as a training script may leave it) cut prompts short
    or put pad tokens into them, silently; prompts are tokenized whole, one at a time."""
    from tokenizers import Tokenizer

    from phi_jax.cli import generate as cli
    from phi_jax.cli.common import load_tokenizer
    plain = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    recorded = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    recorded.enable_truncation(max_length=2)
    recorded.enable_padding(pad_id=0, length=24)
    recorded.save(str(tmp_path / "tokenizer.json"))
    prompt = LONG[0]
    n = len(plain.encode(prompt).ids)
    assert n > 2
    assert main(["generate", "--model", model_dir, "--tokenizer", str(tmp_path), prompt, "--max-new-tokens",
                 "1"]) == EXIT_OK
    assert f"prefill: {n} tokens" in capsys.readouterr().err
    _write_prompts(tmp_path / "p.jsonl", SHORT[:2])
    prompts = cli._read_prompts(str(tmp_path / "p.jsonl"), load_tokenizer(str(tmp_path), option=True))
    assert [p["ids"] for p in prompts] == [plain.encode(s).ids for s in SHORT[:2]]
