"""Writes docs/model_card.md from the shipped model's metrics.json (so no figure in the card is typed by hand).

    python recipes/tiny_code_card.py [--shipped phi_jax/shipped] [--out docs/model_card.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def card(m: dict, png: str) -> str:
    opt = m["optimizer"]
    valid = ", ".join(f"`{f}`" for f in m["valid_files"])
    lines = [
        "## The shipped model: a tiny Phi for Python",
        "",
        "phi_jax ships a small Phi trained from scratch by phi_jax itself (`recipes/tiny_code.py`), so that",
        "`phi-jax generate \"def fibonacci(n):\"` works with no download; `phi_jax.shipped_model_path()` is its",
        "directory (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `metrics.json`,",
        "`valid_slice.safetensors`, `loss_curve.png`), which transformers' `PhiForCausalLM` and `AutoTokenizer` load as",
        "they are. It is a demonstration of the whole pipeline, not a useful code assistant: it writes Python-shaped",
        "text, not working programs.",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | Phi (parallel attention + MLP block, partial rotary 0.5, gelu_new), "
        f"{m['config']['num_hidden_layers']} layers, hidden {m['config']['hidden_size']}, "
        f"{m['config']['num_attention_heads']} heads, MLP {m['config']['intermediate_size']}, "
        f"context {m['seq_len']} |",
        f"| Parameters | {m['parameters']:,} |",
        f"| Tokenizer | byte-level BPE, {m['config']['vocab_size']} tokens (`tokenizers`), trained on the training "
        "files; `<\\|endoftext\\|>` ends each file |",
        f"| Training data | the standard library of {m['python']}: {len(m['train_files'])} `.py` files, "
        f"{m['train_tokens']:,} tokens (tests, site-packages, idlelib, lib2to3, turtledemo, encodings and "
        "pydoc_data left out) |",
        f"| Validation data | {len(m['valid_files'])} held-out files ({m['holdout']}), {m['valid_tokens']:,} tokens |",
        f"| Training | {m['steps']} steps of {m['batch_size']} x {m['seq_len']} tokens "
        f"({m['tokens_seen']:,} tokens, {m['epochs']} epochs), AdamW lr {opt['lr']} "
        f"(warmup {opt['warmup']}, cosine to {opt['end_lr']:.1e}), weight decay {opt['weight_decay']}, "
        f"clip {opt['clip']}, seed {m['seed']} |",
        f"| Trained with | {m['trained_with']} |",
        f"| Wall time | {m['wall_time_s'] / 60:.1f} min of training on {m['hardware']}, shared with other jobs "
        f"(load average {m['load_average_at_end'][1]:.1f} at the end) |",
        f"| Validation loss | **{m['valid_loss']:.3f}** nats/token (perplexity {m['valid_perplexity']:.1f}) |",
        f"| Unigram baseline | {m['unigram_valid_loss']:.3f} nats/token (perplexity "
        f"{m['unigram_valid_perplexity']:.1f}), training-token frequencies on the same predictions |",
        "",
        f"Held-out files: {valid}.",
        "",
        f"![loss curve]({png})",
        "",
        "Completions of the prompts by the shipped model, as recorded at training time (`metrics.json`); each command",
        "prints the text that follows its prompt (`$'...'` is bash's quoting that turns `\\n` into a newline):",
        "",
    ]
    for s in m["samples"]:
        lines += [f"`{' '.join(filter(None, ['phi-jax generate', bash_quote(s['prompt']), s['flags']]))}`", "",
                  "```python", (s["prompt"] + s["completion"]).rstrip("\n"), "```", ""]
    lines += [
        "Reproduce (fixed seeds; resumes from `--work` if interrupted):",
        "",
        "```bash",
        "PYTHONPATH=. python recipes/tiny_code.py --out phi_jax/shipped --work /tmp/tiny_code",
        "python recipes/tiny_code_card.py",
        "```",
        "",
        "`tests/test_shipped.py` checks the shipped files: logits equal transformers' (<= 1e-4 relative), greedy",
        "generation equals transformers' `generate`, the tokenizer round-trips Python source exactly, and the",
        f"loss on the recorded validation slice ({m['slice']['rows']} rows of {m['slice']['seq_len']} tokens: "
        f"{m['slice']['loss']:.4f}) is reproduced.",
        "",
    ]
    assert math.isfinite(m["valid_loss"])
    return "\n".join(lines)


def bash_quote(text: str) -> str:
    """`text` as bash passes it to a command unchanged: "..." when that needs no escapes, else $'...' (whose \\n is
    a newline, where bash leaves \\n inside "..." as a backslash and an n)."""
    if not any(c in text for c in '\n\t"\\$`!\''):
        return f'"{text}"'
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"$'{escaped}'"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shipped", default=os.path.join(ROOT, "phi_jax", "shipped"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "model_card.md"))
    args = p.parse_args(argv)
    with open(os.path.join(args.shipped, "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(args.shipped, "config.json")) as f:
        m["config"] = json.load(f)
    png = os.path.relpath(os.path.join(args.shipped, "loss_curve.png"), os.path.dirname(os.path.abspath(args.out)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(card(m, png))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
