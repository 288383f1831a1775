"""Trains phi_jax's shipped tiny code model from scratch on the installed CPython's standard library.

    PYTHONPATH=. python recipes/tiny_code.py --out phi_jax/shipped --work /tmp/tiny_code
    PYTHONPATH=. python recipes/tiny_code.py --measure 20   # tokens/s of the train step only

Steps (fixed seeds throughout; `--work` keeps the tokenizer, Orbax checkpoints and the log, so an
interrupted run resumes where it stopped):
  1. corpus: `.py` files of the standard library (recipes/tiny_code_data.py), 1 in 20 held out by path hash;
  2. tokenizer: byte-level BPE (`tokenizers`), `--vocab-size` tokens, trained on the training files;
  3. model: phi-1's shape scaled down (parallel block, partial rotary 0.5, gelu_new), N(0, 0.02) init;
  4. training with `phi_jax.train` (recipes/tiny_code_train.py): packed rows of `--seq-len` tokens (no attention
     across files), AdamW with warmup + cosine decay and clipping, Orbax checkpoints;
  5. evaluation: loss on every held-out row, on the first `--slice-rows` rows (the slice tests/test_shipped.py
     re-evaluates) and a unigram baseline on the same predictions; greedy sample completions;
  6. output: config.json, model.safetensors, tokenizer files, metrics.json, loss_curve.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import tiny_code_data as data  # noqa: E402
import tiny_code_train as loop  # noqa: E402
from phi_jax.config import PhiConfig  # noqa: E402
from phi_jax.modeling.model import PhiForCausalLM  # noqa: E402

PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef read_lines(path):", "class Stack:\n    def __init__(self):",
           "    for i in range(len(items)):")


SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json",
           "valid_slice.safetensors", "loss_curve.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "phi_jax", "shipped"))
    p.add_argument("--work", default="/tmp/tiny_code")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000, help="the shipped model: 1000")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-stride", type=int, default=8, help="periodic evaluations use every n-th validation row")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--slice-rows", type=int, default=16)
    p.add_argument("--measure", type=int, default=0, help="only time this many train steps and exit")
    return p.parse_args(argv)


def build_config(args, eos_id: int) -> PhiConfig:
    return PhiConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                     intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, hidden_act="gelu_new", max_position_embeddings=args.seq_len,
                     rope_parameters=dict(partial_rotary_factor=0.5, rope_theta=10000.0),
                     bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, architectures=("PhiForCausalLM",))


def tokenizer_in(work: str, train_texts, vocab_size: int, seq_len: int):
    from tokenizers import Tokenizer

    directory = os.path.join(work, "tokenizer")
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):  # trained once per work directory, so a resumed run keeps its tokenizer
        data.save_tokenizer(data.train_tokenizer(train_texts, vocab_size), directory, seq_len)
    return Tokenizer.from_file(path), directory


def make_trainer(model, train_rows, args, work: str):
    return loop.Trainer(model, train_rows, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, seed=args.seed,
                        ckpt_dir=os.path.join(work, "checkpoints"), save_every=args.save_every)


def measure(model, train_rows, args):
    """Times `args.measure` train steps after one compiling step."""
    import tempfile

    from phi_jax import sharding
    from phi_jax.train.data import batch_at
    from phi_jax.train.step import step_key

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, train_rows, args, tmp)
        batch = {k: sharding.place(v, trainer.batch_sh)
                 for k, v in batch_at(train_rows, 0, args.batch_size, args.seed).items()}
        with jax.set_mesh(trainer.mesh):
            state, metrics = trainer.step_fn(trainer.state, trainer.frozen, batch, step_key(args.seed, 0))
            jax.block_until_ready(metrics)
            t = time.perf_counter()
            for i in range(args.measure):
                state, metrics = trainer.step_fn(state, trainer.frozen, batch, step_key(args.seed, i + 1))
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t
    tokens = args.measure * args.batch_size * args.seq_len
    print(f"{args.measure} steps of {args.batch_size}x{args.seq_len}: {dt / args.measure * 1000:.0f} ms/step, "
          f"{tokens / dt:.0f} tokens/s, loss {float(metrics['loss']):.3f}")


def hardware() -> str:
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = names[0] if names else name
    return f"{os.cpu_count()} CPU cores ({name})" if jax.default_backend() == "cpu" else str(jax.devices()[0])


def samples(model, tok, max_new_tokens: int = 48) -> list[dict]:
    """Greedy completions of every prompt, then sampled ones (temperature 0.7, top-k 40, seed 0) of the first two."""
    from phi_jax.generation.generate import generate

    settings = [(p, {}) for p in PROMPTS] + [(p, dict(do_sample=True, temperature=0.7, top_k=40, seed=0))
                                             for p in PROMPTS[:2]]
    out = []
    for prompt, sampling in settings:
        ids = np.asarray([tok.encode(prompt).ids], np.int32)
        new = list(generate(model, ids, max_new_tokens=max_new_tokens, **sampling)[0, ids.shape[1]:])
        eos = model.config.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        flags = f"--max-new-tokens {max_new_tokens}" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in sampling.items() if k != "do_sample")
        out.append({"prompt": prompt, "completion": tok.decode([int(t) for t in new]), "flags": flags,
                    **sampling})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    root = data.stdlib_root()
    train_files, valid_files = data.split_files(root)
    train_texts = [data.read_source(root, f) for f in train_files]
    valid_texts = [data.read_source(root, f) for f in valid_files]
    tok, tok_dir = tokenizer_in(args.work, train_texts, args.vocab_size, args.seq_len)
    eos_id = tok.token_to_id(data.EOS)
    train_docs = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(train_texts)]
    valid_docs = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(valid_texts)]
    train_rows = loop.pack_documents(train_docs, eos_id, args.seq_len)
    valid_rows = loop.contiguous_rows(valid_docs, eos_id, args.seq_len)
    train_ids = np.concatenate([np.append(d, eos_id) for d in train_docs])
    print(f"{data.python_version()}: {len(train_files)} training files ({train_ids.size} tokens in "
          f"{len(train_rows['input_ids'])} rows), {len(valid_files)} held out ({valid_rows.size} tokens)", flush=True)

    config = build_config(args, eos_id)
    model = PhiForCausalLM(config, rngs=nnx.Rngs(args.seed))
    loop.init_like_hf(model, args.seed, config.initializer_range)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {n_params} parameters", flush=True)
    if args.measure:
        measure(model, train_rows, args)
        return 0

    log_path = os.path.join(args.work, "log.jsonl")
    trainer = make_trainer(model, train_rows, args, args.work)
    wall = trainer.run(valid_rows, eval_every=args.eval_every, eval_stride=args.eval_stride, log_path=log_path)
    model = trainer.model()
    valid_loss = trainer.evaluate(valid_rows)
    slice_rows = valid_rows[: args.slice_rows]
    slice_loss = trainer.evaluate(slice_rows)
    unigram = loop.unigram_loss(train_ids, valid_rows, config.vocab_size)
    unigram_slice = loop.unigram_loss(train_ids, slice_rows, config.vocab_size)
    print(f"validation loss {valid_loss:.4f} (unigram {unigram:.4f}); slice {slice_loss:.4f}", flush=True)

    stage = os.path.join(args.work, "shipped")  # everything is written here, then copied into --out
    model.save_pretrained(stage)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(stage, name))
    from safetensors.numpy import save_file
    save_file({"input_ids": np.ascontiguousarray(slice_rows)}, os.path.join(stage, "valid_slice.safetensors"))
    loop.plot_losses(log_path, os.path.join(stage, "loss_curve.png"), unigram, args.eval_stride, valid_loss)
    metrics = {
        "python": data.python_version(), "platform": platform.platform(), "stdlib_root": root,
        "excluded_dirs": sorted(data.EXCLUDED_DIRS), "excluded_files": sorted(data.EXCLUDED_FILES),
        "holdout": f"sha256(relative path) % {data.HOLDOUT_MODULUS} == 0",
        "train_files": {f: data.file_digest(root, f) for f in train_files},
        "valid_files": {f: data.file_digest(root, f) for f in valid_files},
        "train_tokens": int(sum(len(d) + 1 for d in train_docs)),
        "valid_tokens": int(sum(len(d) + 1 for d in valid_docs)),
        "parameters": int(n_params), "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "epochs": round(args.steps * args.batch_size / len(train_rows["input_ids"]), 2),
        "optimizer": {"name": "adamw", "lr": args.lr, "warmup": args.warmup, "schedule": "warmup_cosine_decay",
                      "end_lr": args.lr * 0.1, "b1": 0.9, "b2": 0.95, "weight_decay": args.weight_decay,
                      "clip": args.clip},
        "wall_time_s": round(wall, 1), "hardware": hardware(), "load_average_at_end": os.getloadavg(),
        "valid_loss": valid_loss, "valid_perplexity": loop.perplexity(valid_loss),
        "valid_predictions": int(valid_rows[:, 1:].size),
        "unigram_valid_loss": unigram, "unigram_valid_perplexity": loop.perplexity(unigram),
        "slice": {"rows": int(len(slice_rows)), "seq_len": args.seq_len, "loss": slice_loss,
                  "unigram_loss": unigram_slice,
                  "description": "the first rows of the held-out files' tokens (files in valid_files order, each "
                                 "followed by <|endoftext|>, cut into rows of seq_len)"},
        "samples": samples(model, tok),
        "trained_with": "recipes/tiny_code.py on phi_jax.train (train.data packing, train.step AdamW step, "
                        "train.checkpoint Orbax checkpoints)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {m.__name__: m.__version__ for m in (jax, np)},
    }
    with open(os.path.join(stage, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    os.makedirs(args.out, exist_ok=True)
    for name in SHIPPED:  # copies: new files, readable by everyone (atomic writes create files 0600)
        tmp = os.path.join(args.out, f".{name}.tmp")
        shutil.copyfile(os.path.join(stage, name), tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(args.out, name))
    for s in metrics["samples"]:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
