"""`phi-jax generate`: text from one prompt (streamed), or from a JSONL file of prompts in batches.

One prompt: `phi-jax generate [--model DIR] "prompt"` writes the completion to stdout as it is produced, then
a stats line to stderr (prefill and decode speed, compilation timed apart, why it stopped).

A file: `phi-jax generate --model DIR --input prompts.jsonl --output completions.jsonl [--batch-size N]`.
Each input line is a JSON object with a string "prompt" (other keys are copied to the output, but not the
output's own: "line", "completion", "new_tokens", "stopped") or a JSON string. Prompts are grouped by length
bucket (`bucket_length`), decoded `--batch-size` at a time through `model.generate`, and written to --output
as one JSON line per prompt, in input order (an existing OUTPUT is an error unless --overwrite):
`{"line": n, ...input keys, "prompt": ..., "completion": ..., "new_tokens": k, "stopped": "eos"|"length"}`.
A progress bar on stderr counts prompts and shows new tokens/s (unless --no-progress, as in `finetune`).
`--mesh data=2,fsdp=2,tensor=2` loads the model onto a device mesh (the completions are those of one device).

Resuming: finished prompts are appended to `OUTPUT.partial` (its first line: the settings) after each batch,
and the complete OUTPUT is written in one rename at the end. A rerun of an interrupted command reuses every
result found there with the same line number and prompt text; other settings are an error naming them, and
so are results without a readable settings line (they cannot be matched to the options: delete the file to
start over). Batches are formed from the whole input, never from the unfinished prompts alone, and a batch
with any unfinished prompt is decoded whole again, so a resumed run decodes exactly the batches of an
uninterrupted one. Sampling draws each prompt with its own key, `--seed` + its line number (per-row seeds of
`generate`): a completion depends on its prompt and line number, not on its batch mates, so --batch-size may
change on a resume, sampled or greedy (up to rounding differences between batch shapes in the logits, which can
flip a draw or an argmax at a near tie; the same --batch-size reproduces the uninterrupted run exactly, on the
same machine and software).

The tokenizer is `tokenizer.json` of the model directory (or of --tokenizer), read by `tokenizers`. Without
--model, the tiny code model that ships inside the package is used (`phi_jax.shipped_model_path()`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HELP = "generate text from a prompt (streaming) or from a JSONL file of prompts (batched, resumable)"
COMPILES = True

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt text (or use --input)")
    parser.add_argument("--model", default=None, help="checkpoint directory (Hugging Face, Orbax or Microsoft); "
                        "default: the tiny code model shipped with phi_jax (phi_jax.shipped_model_path())")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json, or a directory holding one (default: the model directory's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (implies --do-sample)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (implies --do-sample)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus probability (implies --do-sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and compute dtype")
    parser.add_argument("--input", metavar="JSONL", help="prompts, one JSON line each (instead of PROMPT)")
    parser.add_argument("--output", metavar="JSONL", help="completions, one JSON line per prompt (with --input); "
                        "must not exist unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (with --input)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (with --input)")
    parser.add_argument("--mesh", default="", metavar="data=N,fsdp=N,tensor=N",
                        help="load the model onto a device mesh (as finetune's --mesh; default: one device): rows of "
                             "a batch split over data and fsdp, heads and the MLP over tensor; fsdp, if not given, "
                             "takes the devices data and tensor leave")


def _sampling(args) -> dict:
    do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return dict(do_sample=do_sample, temperature=1.0 if args.temperature is None else args.temperature,
                top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens)


def _eos_ids(config) -> set[int]:
    eos = config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _check_args(args) -> None:
    if args.prompt is None and args.input is None:
        raise ValueError("no prompt: give PROMPT or --input JSONL")
    if args.prompt is not None and args.input is not None:
        raise ValueError("give PROMPT or --input JSONL, not both")
    if args.input is None and (args.output is not None):
        raise ValueError("--output goes with --input")
    if args.mesh:
        _mesh(args.mesh)  # a bad entry or too few devices: an error before anything is read
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output JSONL")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model directory not found: {args.model}")
    if args.output is not None:
        if os.path.isdir(args.output):
            raise ValueError(f"--output {args.output} is a directory; give the path of a JSONL file")
        if os.path.isfile(args.input) and os.path.exists(args.output) and os.path.samefile(args.input, args.output):
            raise ValueError(f"--output {args.output} is the --input file; give another path")
        if os.path.exists(args.output) and not args.overwrite:
            raise FileExistsError(f"--output {args.output} exists; pass --overwrite to replace it, or choose another "
                                  f"path")
    elif args.overwrite:
        raise ValueError("--overwrite goes with --output")


def run(args) -> int:
    if args.model is None:
        from phi_jax.shipped.paths import shipped_model_path
        args.model = shipped_model_path()
    _check_args(args)
    from phi_jax.cli.common import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer or args.model, option=args.tokenizer is not None)
    prompts = _read_prompts(args.input, tokenizer) if args.input else None
    done = _finished(args.output + ".partial", prompts, _settings(args)) if args.input else None

    import jax.numpy as jnp

    from phi_jax.modeling.model import PhiForCausalLM
    model = PhiForCausalLM.from_pretrained(os.path.abspath(args.model), dtype=getattr(jnp, args.dtype),
                                           mesh=_mesh(args.mesh))
    if prompts is not None:
        return _run_file(args, model, tokenizer, prompts, done)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    _check_vocab(ids, model.config.vocab_size, "the prompt")
    return _run_prompt(args, model, tokenizer, ids)


def _mesh(text: str):
    """`--mesh` as a device mesh, or None (one device) when not given."""
    if not text:
        return None
    from phi_jax import sharding
    return sharding.make_mesh(**sharding.parse_mesh(text))


def _check_vocab(ids, vocab_size: int, where: str) -> None:
    top = max(ids)
    if top >= vocab_size:
        raise ValueError(f"{where} encodes to token id {top}, outside the model's vocabulary (vocab_size "
                         f"{vocab_size}); is the tokenizer the model's? (--tokenizer)")


# ---- one prompt, streamed ---------------------------------------------------------------------------

def _stream_text(tokenizer, token_stream, eos: set[int], out) -> tuple[list[int], bool]:
    """Writes the decoded text as tokens arrive (holding back an incomplete multi-byte character).
    Returns (tokens before eos, whether an eos came)."""
    tokens, shown, stopped = [], "", False
    for tok in token_stream:
        tok = int(tok[0])
        if tok in eos:
            stopped = True
            break
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    out.write((text[len(shown):] if text.startswith(shown) else "") + "\n")
    out.flush()  # the completion's last line is out before the stats line goes to stderr
    return tokens, stopped


def _run_prompt(args, model, tokenizer, ids: list[int]) -> int:
    import numpy as np

    from phi_jax.cli.common import compile_events
    stamps = []

    def timed(stream):
        for tok in stream:
            stamps.append((time.perf_counter(), events.seconds))
            yield tok

    prompt = np.asarray([ids], np.int32)  # [1, T]
    with compile_events() as events:
        start = time.perf_counter()
        stream = model.generate_stream(prompt, seed=args.seed, **_sampling(args))
        tokens, at_eos = _stream_text(tokenizer, timed(stream), _eos_ids(model.config), sys.stdout)
    first, compile_first = stamps[0]
    prefill = max(first - start - compile_first, 1e-9)
    report = [f"prefill: {len(ids)} tokens in {prefill:.3f} s ({len(ids) / prefill:.1f} tokens/s)"]
    steps = len(stamps) - 1
    if steps:
        decode = max(stamps[-1][0] - first - (stamps[-1][1] - compile_first), 1e-9)
        report.append(f"decode: {steps} tokens in {decode:.3f} s ({steps / decode:.1f} tokens/s)")
    report.append(f"compilation: {events.describe()}")
    why = "stopped at eos" if at_eos else f"stopped at --max-new-tokens {args.max_new_tokens}"
    report.append(f"{len(tokens)} new tokens, {why}")
    print("; ".join(report), file=sys.stderr, flush=True)
    return 0


# ---- a JSONL file, batched and resumable ------------------------------------------------------------

def _read_prompts(path: str, tokenizer) -> list[dict]:
    """[{"line", "record", "ids"}] for every non-blank line; a bad line is a ValueError naming it."""
    from phi_jax.io.jsonl import read_jsonl
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    prompts = []
    for n, line, record in read_jsonl(path, lambda n: f"{path} line {n}"):
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path} line {n}: expected a JSON object with a string \"prompt\" "
                             f"(or a JSON string), got {line.strip()[:80]}")
        reserved = [k for k in ("line", *RESULT_KEYS) if k in record]
        if reserved:  # the output's keys: an input value would be lost in it
            raise ValueError(f"{path} line {n}: the key \"{reserved[0]}\" is reserved for the output")
        prompts.append({"line": n, "record": record})
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    for p, enc in zip(prompts, tokenizer.encode_batch([p["record"]["prompt"] for p in prompts])):
        if not enc.ids:
            raise ValueError(f"{path} line {p['line']}: the prompt encodes to no tokens")
        p["ids"] = enc.ids
    return prompts


def _settings(args) -> dict:
    """What the completions depend on (not --batch-size: each prompt draws with its own key)."""
    return {"model": os.path.abspath(args.model), "tokenizer": args.tokenizer and os.path.abspath(args.tokenizer),
            "dtype": args.dtype, "seed": args.seed, **_sampling(args)}


RESULT_KEYS = ("completion", "new_tokens", "stopped")


def _finished(partial: str, prompts, settings: dict) -> dict[int, dict]:
    """Results an interrupted run of the same command wrote to `partial` (its first line: the settings), keyed by
    line number, for the lines whose prompt text is unchanged: `{"line", ...current input keys, RESULT_KEYS}`.

    Results without a readable settings line are a ValueError: nothing says which options produced them."""
    if not os.path.isfile(partial):
        return {}
    stored, results = None, []
    with open(partial, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if not isinstance(r, dict):
                continue
            if i == 0 and isinstance(r.get("settings"), dict):
                stored = r["settings"]
            elif isinstance(r.get("line"), int) and all(k in r for k in RESULT_KEYS):
                results.append(r)
    if stored is None:
        if results:
            raise ValueError(f"{partial} holds {len(results)} results but no settings line (its line 1), so they "
                             f"cannot be matched to these options; delete it to start over")
        return {}  # nothing to reuse (e.g. a settings line cut short): a fresh start
    if stored != settings:
        changed = sorted(k for k in set(settings) | set(stored) if settings.get(k) != stored.get(k))
        raise ValueError(f"{partial} holds results of an interrupted run with other settings "
                         f"({', '.join(changed)}); rerun with the same options, or delete it to start over")
    current = {p["line"]: p for p in prompts}
    return {r["line"]: {"line": r["line"], **current[r["line"]]["record"], **{k: r[k] for k in RESULT_KEYS}}
            for r in results if r["line"] in current and current[r["line"]]["record"]["prompt"] == r.get("prompt")}


def _batches(prompts: list[dict], batch_size: int, done) -> list[list[dict]]:
    """The batches holding an unfinished prompt (a line not in `done`), each decoded whole. Prompts are grouped
    by length bucket (each bucket compiles one program per batch shape), in line order inside a bucket,
    `batch_size` at a time, over the whole input: a resumed run decodes the batches an uninterrupted run does."""
    from phi_jax.generation.generate import bucket_length
    buckets: dict[int, list[dict]] = {}
    for p in prompts:
        buckets.setdefault(bucket_length(len(p["ids"])), []).append(p)
    batches = [buckets[b][i:i + batch_size] for b in sorted(buckets) for i in range(0, len(buckets[b]), batch_size)]
    return [batch for batch in batches if any(p["line"] not in done for p in batch)]


def _generate_batch(model, batch: list[dict], batch_size: int, sampling: dict, seed: int, eos: set[int]):
    """New tokens of each prompt (cut before its eos) and whether an eos came. Row keys: `seed` + line number."""
    import numpy as np
    rows = 1
    while rows < len(batch):
        rows *= 2
    rows = min(rows, batch_size)  # a short last batch is padded to a power of two: fewer shapes to compile
    width = max(len(p["ids"]) for p in batch)
    ids = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.int32)
    seeds = np.zeros(rows, np.int64)
    for r in range(rows):
        p = batch[min(r, len(batch) - 1)]  # padding rows repeat the last prompt
        ids[r, width - len(p["ids"]):] = p["ids"]  # left padding
        mask[r, width - len(p["ids"]):] = 1
        seeds[r] = (seed + p["line"]) % 2 ** 32
    out = model.generate(ids, mask, seed=seeds, **sampling)[:len(batch), width:]
    results = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        results.append((row if cut is None else row[:cut], cut is not None))
    return results


def _write_atomic(path: str, lines: list[str]) -> None:
    from phi_jax.io.atomic import umask_mode
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())  # mkstemp's file is owner-only; the output gets what `open` would give it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _run_file(args, model, tokenizer, prompts: list[dict], done: dict[int, dict]) -> int:
    from tqdm import tqdm

    from phi_jax.cli.common import compile_events
    vocab = model.config.vocab_size
    for p in prompts:
        _check_vocab(p["ids"], vocab, f"{args.input} line {p['line']}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"directory not found: {out_dir} (for --output {args.output})")
    partial = args.output + ".partial"
    earlier = len(done)
    # the partial file starts over clean: the settings and the reusable results (no line cut short to append to)
    _write_atomic(partial, [json.dumps({"settings": _settings(args)}) + "\n"]
                  + [json.dumps(done[n], ensure_ascii=False) + "\n" for n in sorted(done)])
    eos, sampling = _eos_ids(model.config), _sampling(args)
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), initial=earlier, unit="prompt", disable=args.no_progress, file=sys.stderr)
    with compile_events() as events, bar, open(partial, "a", encoding="utf-8") as log:
        for batch in _batches(prompts, args.batch_size, done):
            results = _generate_batch(model, batch, args.batch_size, sampling, args.seed, eos)
            fresh = [(p, r) for p, r in zip(batch, results) if p["line"] not in done]
            for p, (tokens, at_eos) in fresh:
                done[p["line"]] = {"line": p["line"], **p["record"],
                                   "completion": tokenizer.decode(tokens, skip_special_tokens=True),
                                   "new_tokens": len(tokens), "stopped": "eos" if at_eos else "length"}
                log.write(json.dumps(done[p["line"]], ensure_ascii=False) + "\n")
                new_tokens += len(tokens)
            log.flush()
            os.fsync(log.fileno())
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} tokens/s", refresh=False)
            bar.update(len(fresh))
    _write_atomic(args.output, [json.dumps(done[p["line"]], ensure_ascii=False) + "\n" for p in prompts])
    os.remove(partial)
    seconds = time.perf_counter() - start
    print(f"wrote {args.output}: {len(prompts)} prompts ({len(prompts) - earlier} generated now, "
          f"{earlier} from an earlier run); {new_tokens} new tokens in {seconds:.1f} s "
          f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s); compilation: {events.describe()}", file=sys.stderr)
    return 0
