"""`phi-jax generate --model DIR "prompt"`: streams a completion, then prints prefill and decode speed.

The completion goes to stdout as it is produced; the timing line goes to stderr. Compilation
(the first call for a prompt bucket) is timed apart from prefill and decode.
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "generate text from a prompt, streaming tokens as they are produced"

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (weights and tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer directory, if not the model's")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (implies --do-sample)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (implies --do-sample)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus probability (implies --do-sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and compute dtype")


def _stream_text(tokenizer, token_stream, eos: set[int], out) -> list[int]:
    """Writes the decoded text as tokens arrive (holding back an incomplete multi-byte character)."""
    tokens, shown = [], ""
    for tok in token_stream:
        tok = int(tok[0])
        if tok in eos:
            break
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n") if text.startswith(shown) else out.write("\n")
    return tokens


def run(args) -> int:
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from phi_jax.generation.generate import count_compilations, generate_stream
    from phi_jax.modeling.model import PhiForCausalLM

    do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    sampling = dict(do_sample=do_sample, temperature=1.0 if args.temperature is None else args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        print(f"error: cannot load a tokenizer from {args.tokenizer or args.model}: {e}", file=sys.stderr)
        return 2
    dtype = getattr(jnp, args.dtype)
    model = PhiForCausalLM.from_pretrained(args.model, dtype=dtype)
    ids = np.asarray(tokenizer(args.prompt)["input_ids"], np.int32)[None]  # [1, T]
    if ids.shape[1] == 0:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    eos = model.config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    stamps = []

    def timed(stream):
        for tok in stream:
            stamps.append((time.perf_counter(), compiled.seconds))
            yield tok

    try:
        with count_compilations() as compiled:
            start = time.perf_counter()
            tokens = _stream_text(tokenizer, timed(generate_stream(model, ids, **sampling)), eos, sys.stdout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first, compile_first = stamps[0]
    prefill = first - start - compile_first
    decode = stamps[-1][0] - first - (stamps[-1][1] - compile_first)
    steps = len(stamps) - 1
    report = [f"prefill: {ids.shape[1]} tokens in {prefill:.3f} s ({ids.shape[1] / prefill:.1f} tokens/s)"]
    if steps:
        report.append(f"decode: {steps} tokens in {decode:.3f} s ({steps / decode:.1f} tokens/s)")
    report.append(f"compilation: {compiled.seconds:.2f} s; {len(tokens)} tokens before eos")
    print("; ".join(report), file=sys.stderr)
    return 0
