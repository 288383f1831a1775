"""Validation loss of a fine-tuning run: the mean next-token loss over every target of held-out packed rows.

The rows come from `data.load_dataset` (the same packing as the training data: documents apart, positions
restarting, prompt tokens not counted), taken in file order `batch_size` at a time. A last short batch is filled
with rows whose labels are all ignored, so every batch has the training batch's shape and sharding (one
compiled program) and the filler counts for nothing. The loss is the sum of every target's NLL over the number
of targets (each target weighs the same, whatever its batch), with dropout off.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import phi_jax.sharding as sharding
from phi_jax.modeling.losses import IGNORE_INDEX
from phi_jax.train.step import SplitModel, make_loss_fn


def eval_batches(rows: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """`rows` in order, `batch_size` rows a batch; the last filled with copies of row 0 whose labels are all
    `IGNORE_INDEX` (they add no target)."""
    n = len(rows["input_ids"])
    batches = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        short = batch_size - len(batch["input_ids"])
        if short:
            filler = {k: np.repeat(v[:1], short, axis=0) for k, v in rows.items()}
            filler["labels"] = np.full_like(filler["labels"], IGNORE_INDEX)
            batch = {k: np.concatenate([batch[k], filler[k]]) for k in batch}
        batches.append(batch)
    return batches


def make_eval_fn(split: SplitModel, params_sharding, frozen_sharding, batch_sharding, mesh,
                 rules=sharding.DEFAULT_RULES) -> Callable:
    """`eval_fn(params, frozen, batch) -> (nll_sum, targets)`, jitted with the train step's shardings.
    `split` must have dropout off (`split_model(..., train=False)`)."""
    loss_fn = make_loss_fn(split)

    def traced(params, frozen, batch):
        with sharding.rules_in_force(mesh, rules):  # the model's activation constraints, while tracing
            return loss_fn(params, frozen, batch, None)

    return jax.jit(traced, in_shardings=(params_sharding, frozen_sharding, batch_sharding))


def evaluate(eval_fn: Callable, params, frozen, batches: list[dict[str, np.ndarray]], batch_sharding
             ) -> tuple[float, int]:
    """(mean loss over every target, number of targets) of `batches` (from `eval_batches`)."""
    nll, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    for batch in batches:
        b_nll, b_count = eval_fn(params, frozen, {k: sharding.place(v, batch_sharding) for k, v in batch.items()})
        nll, count = nll + b_nll, count + b_count  # on the device: one transfer at the end
    count = int(count)
    return float(nll) / max(count, 1), count
