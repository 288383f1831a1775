"""The training loop of the tiny code model: AdamW (optax) on packed rows, Orbax checkpoints, a JSON-lines log.

Rows: the training files' tokens, each file followed by `<|endoftext|>`, concatenated and cut into rows of
`seq_len` tokens; every epoch visits the rows in an order drawn from `seed` and the epoch number, so the
batch at step s is a function of (seed, s) alone and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from phi_jax.modeling.losses import causal_lm_loss


def pack_rows(docs: list[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
    """`[rows, seq_len]` int32: documents joined by eos, the tail shorter than a row dropped."""
    flat = np.concatenate([np.append(d, eos_id) for d in docs]).astype(np.int32)
    rows = len(flat) // seq_len
    return flat[: rows * seq_len].reshape(rows, seq_len)


def batch_at(rows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The batch of step `step` (0-based): epoch e = step // steps_per_epoch visits a seeded permutation."""
    per_epoch = len(rows) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    return rows[order[i * batch_size:(i + 1) * batch_size]]


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


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float, clip: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.1)

    def decay_mask(params):  # no weight decay on biases, LayerNorm and embeddings
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(str(getattr(k, "key", getattr(k, "name", k))) == "kernel" for k in path), params)

    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))
    return tx, schedule


def loss_fn(graphdef, params, rest, ids):
    model = nnx.merge(graphdef, params, rest)
    return causal_lm_loss(model(ids).logits, ids)


def make_train_step(graphdef, rest, tx):
    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, rest, ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)
    return step


def make_eval(graphdef, rest):
    @jax.jit
    def nll_sum(params, ids):
        """(summed next-token NLL, number of predictions) over `ids: [B, T]`."""
        model = nnx.merge(graphdef, params, rest)
        logits = model(ids).logits[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll), nll.size
    return nll_sum


def evaluate(nll_sum, params, rows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss over every prediction inside the rows (float64 accumulation)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, n = nll_sum(params, jnp.asarray(rows[i:i + batch_size]))
        total += float(s)
        count += int(n)
    return total / count


def unigram_loss(train_rows: np.ndarray, valid_rows: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the training tokens' unigram frequencies (add-one smoothed) on the
    validation predictions (every token but each row's first, the tokens the model's loss covers)."""
    counts = np.bincount(train_rows.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[valid_rows[:, 1:]].mean())


def train(model, train_rows, valid_rows, *, steps, batch_size, lr, warmup, weight_decay, clip, seed,
          eval_every, eval_stride, ckpt_dir, log_path, save_every):
    """Trains `model` in place; resumes from the newest checkpoint in `ckpt_dir`. Every `eval_every` steps the log
    records the loss on every `eval_stride`-th validation row. Returns the wall seconds of this run's steps plus
    those recorded before a resume."""
    import orbax.checkpoint as ocp

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(lr, warmup, steps, weight_decay, clip)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, rest, tx)
    nll_sum = make_eval(graphdef, rest)
    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start, wall_before = 0, 0.0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          {"params": params, "opt_state": opt_state, "wall": 0.0})
        restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        params, opt_state, wall_before = restored["params"], restored["opt_state"], float(restored["wall"])
        print(f"resumed at step {start} ({wall_before:.0f} s of training before)", flush=True)
    mode = "a" if start else "w"
    t0 = time.perf_counter()
    tokens = 0
    with open(log_path, mode) as log:
        for step in range(start, steps):
            ids = jnp.asarray(batch_at(train_rows, step, batch_size, seed))
            params, opt_state, loss, gnorm = step_fn(params, opt_state, ids)
            tokens += ids.size
            done = step + 1
            record = None
            if done % 10 == 0 or done == steps:
                wall = wall_before + time.perf_counter() - t0
                record = {"step": done, "loss": float(loss), "grad_norm": float(gnorm), "lr": float(schedule(step)),
                          "wall_s": round(wall, 2), "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
            if done % eval_every == 0 or done == steps:
                record["valid_loss"] = evaluate(nll_sum, params, valid_rows[::eval_stride], batch_size)
            if record:
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
            if done % save_every == 0 or done == steps:
                wall = wall_before + time.perf_counter() - t0
                manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "wall": wall}))
    manager.wait_until_finished()
    nnx.update(model, params)
    return wall_before + time.perf_counter() - t0


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
