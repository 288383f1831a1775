"""The training loop of the tiny code model, on phi_jax's own training code (`phi_jax.train`).

`phi_jax.train` supplies the pieces: documents packed into rows with segment ids and per-document positions,
batches as a function of (seed, step) (`train.data`), the jitted step with AdamW, warmup + cosine decay and
clipping (`train.step`, compiled on a one-device mesh by `train.loop.build`), Orbax checkpoints
(`train.checkpoint`) and the Hugging Face export (`train.loop.export`). This module adds what a from-scratch
run needs on top: transformers' initialisation, periodic validation, a JSON-lines log and the loss curve.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax import sharding
from phi_jax.train import data as train_data
from phi_jax.train.checkpoint import TrainCheckpoints, abstract_like
from phi_jax.train.loop import build
from phi_jax.train.step import TrainConfig, make_optimizer, schedule, split_model, step_key, token_losses


def pack_documents(docs: list[np.ndarray], eos_id: int, seq_len: int) -> dict[str, np.ndarray]:
    """Training rows: each document's tokens then eos, packed by `phi_jax.train.data.pack` (segment ids in
    `attention_mask`, positions restarting per document, every token a target)."""
    documents = [train_data.Document(np.append(d, eos_id).astype(np.int32), np.ones(len(d) + 1, bool))
                 for d in docs]
    return train_data.pack(documents, seq_len)


def contiguous_rows(docs: list[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
    """Validation rows `[rows, seq_len]`: documents joined by eos and cut every `seq_len` tokens (the tail shorter
    than a row dropped); the loss covers every token of a row but its first."""
    flat = np.concatenate([np.append(d, eos_id) for d in docs]).astype(np.int32)
    rows = len(flat) // seq_len
    return flat[: rows * seq_len].reshape(rows, seq_len)


def init_like_hf(model, seed: int, std: float) -> None:
    """transformers' `_init_weights` for Phi: kernels and embeddings ~ N(0, std), biases 0, LayerNorm 1/0."""
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: kv[0])):
        v = var.get_value()
        name = path[-1]
        if name in ("kernel", "embedding"):
            var.set_value(std * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype))
        elif name == "scale":
            var.set_value(jnp.ones_like(v))
        elif name == "bias":
            var.set_value(jnp.zeros_like(v))
        else:
            raise ValueError(f"no initialiser for parameter {'.'.join(map(str, path))}")


def train_config(*, steps, lr, warmup, weight_decay, clip) -> TrainConfig:
    return TrainConfig(learning_rate=lr, warmup_steps=warmup, total_steps=steps, final_lr_ratio=0.1,
                       weight_decay=weight_decay, b1=0.9, b2=0.95, max_grad_norm=clip)


def make_eval(split, frozen):
    @jax.jit
    def nll_sum(params, ids):
        """(summed next-token NLL, number of predictions) over `ids: [B, T]`."""
        return token_losses(split.merge(params, frozen)(ids).logits, ids)
    return nll_sum


def evaluate(nll_sum, params, rows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss over every prediction inside the rows (float64 accumulation)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, n = nll_sum(params, jnp.asarray(rows[i:i + batch_size]))
        total += float(s)
        count += int(n)
    return total / count


def unigram_loss(train_ids: np.ndarray, valid_rows: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the training tokens' unigram frequencies (add-one smoothed) on the
    validation predictions (every token but each row's first, the tokens the model's loss covers)."""
    counts = np.bincount(train_ids.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[valid_rows[:, 1:]].mean())


class Trainer:
    """A from-scratch run: `run()` trains (resuming from the newest checkpoint in `ckpt_dir`); `evaluate(rows)`
    and `export(directory)` use the current parameters."""

    def __init__(self, model, train_rows: dict, *, steps, batch_size, lr, warmup, weight_decay, clip, seed,
                 ckpt_dir, save_every):
        self.split = split_model(model)
        self.cfg = train_config(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, clip=clip)
        self.tx = make_optimizer(self.cfg)
        self.mesh = sharding.make_mesh()
        self.state, self.frozen, self.step_fn, self.batch_sh = build(self.split, self.tx, self.mesh)
        self.nll_sum = make_eval(self.split, self.frozen)
        self.rows, self.steps, self.batch_size, self.seed = train_rows, steps, batch_size, seed
        self.ckpts = TrainCheckpoints(ckpt_dir, save_every=save_every, keep=2)

    def meta(self, step: int, wall: float) -> dict:
        return {"step": step, "wall_s": wall, "seed": self.seed, "batch_size": self.batch_size,
                "data_rows": int(len(self.rows["input_ids"]))}

    def run(self, valid_rows: np.ndarray, *, eval_every: int, eval_stride: int, log_path: str) -> float:
        """Trains to `steps`; every `eval_every` steps the log records the loss on every `eval_stride`-th
        validation row. Returns the wall seconds of all training steps, those before a resume included."""
        start, wall_before = 0, 0.0
        if self.ckpts.latest_step() is not None:
            self.state, meta = self.ckpts.restore(abstract_like(self.state))
            if meta["data_rows"] != len(self.rows["input_ids"]) or meta["seed"] != self.seed:
                raise ValueError(f"cannot resume from {self.ckpts.directory}: it was trained on other data")
            start, wall_before = int(meta["step"]), float(meta["wall_s"])
            print(f"resumed at step {start} ({wall_before:.0f} s of training before)", flush=True)
        lr_at = schedule(self.cfg)
        t0, tokens = time.perf_counter(), 0
        with jax.set_mesh(self.mesh), open(log_path, "a" if start else "w") as log:
            for step in range(start, self.steps):
                host = train_data.batch_at(self.rows, step, self.batch_size, self.seed)
                batch = {k: sharding.place(v, self.batch_sh) for k, v in host.items()}
                self.state, metrics = self.step_fn(self.state, self.frozen, batch, step_key(self.seed, step))
                tokens += host["input_ids"].size
                done = step + 1
                wall = wall_before + time.perf_counter() - t0
                if done % 10 == 0 or done == self.steps:
                    record = {"step": done, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                              "lr": float(lr_at(step)), "wall_s": round(wall, 2),
                              "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
                    if done % eval_every == 0 or done == self.steps:
                        record["valid_loss"] = self.evaluate(valid_rows[::eval_stride])
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    print(json.dumps(record), flush=True)
                self.ckpts.save(done, self.state, self.meta(done, wall), force=done == self.steps)
        self.ckpts.wait()
        return wall_before + time.perf_counter() - t0

    def evaluate(self, rows: np.ndarray) -> float:
        return evaluate(self.nll_sum, self.state["params"], rows, self.batch_size)

    def model(self):
        return self.split.merge(self.state["params"], self.frozen)


def plot_losses(log_path: str, png_path: str, unigram: float, eval_stride: int, final_valid: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train (batch)")
    val = [r for r in records if "valid_loss" in r]
    ax.plot([r["step"] for r in val], [r["valid_loss"] for r in val], "o-", ms=3,
            label=f"validation (every {eval_stride}th held-out row)")
    ax.plot([records[-1]["step"]], [final_valid], "*", ms=9, color="C3",
            label=f"validation, all held-out rows ({final_valid:.2f})")
    ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(0, max(unigram + 1, 3))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("phi_jax tiny code model")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def perplexity(loss: float) -> float:
    return math.exp(loss)
