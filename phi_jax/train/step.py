"""The train step: masked causal-LM loss, optax AdamW (warmup + cosine, clipping), gradient accumulation,
bf16 compute over float32 master weights, per-layer rematerialisation, dropout keys per step.

The model is split once into a graph definition, the trainable parameters (a flat dict keyed by module path,
`model.layers.0.self_attn.q_proj.kernel`), the frozen parameters (LoRA's base weights; empty for full
fine-tuning) and the rest (dropout RNG state). The step is a pure function of
`(state, frozen, batch, key)` with `state = {"step", "params", "opt_state"}`; `jit_step` compiles it with
the mesh shardings of `phi_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from phi_jax.modeling.losses import shift_labels, token_nll
from phi_jax.modeling.remat import POLICIES as REMAT_POLICIES
from phi_jax.modeling.remat import remat_policy as resolve_remat_policy

BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and step options.

    learning_rate: peak, reached after `warmup_steps` (linear from 0), then cosine decay to
      `learning_rate * final_lr_ratio` at `total_steps`.
    accum_steps: a batch of B rows runs as `accum_steps` micro-batches of B / accum_steps rows (one update;
      with dropout, other masks: see `grads_and_loss`).
    remat_policy: a `jax.checkpoint_policies` name (e.g. "nothing_saveable", "dots_with_no_batch_dims_saveable")
      or phi_jax's "dots_and_attention_saveable" (phi_jax/modeling/remat.py: also keeps the fused attention's
      residuals) to recompute each decoder layer in the backward pass; None keeps every activation.
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    accum_steps: int = 1
    remat_policy: str | None = None

    def __post_init__(self):
        """A value the step cannot use is a ValueError naming the field as `TrainConfig.<field>` (a NaN or negative
        rate would train silently wrong; accum_steps 0 failed as a ZeroDivisionError; an unknown remat policy
        failed only once the model was read). Numpy scalars become Python numbers (a checkpoint's JSON meta
        records them)."""
        for name, low in (("warmup_steps", 0), ("total_steps", 1), ("accum_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("learning_rate", "final_lr_ratio", "weight_decay", "b1", "b2", "eps", "max_grad_norm"):
            value = getattr(self, name)
            if value is None and name == "max_grad_norm":
                continue
            positive = name in ("eps", "max_grad_norm")
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                    or not math.isfinite(value) or value < 0 or (positive and value == 0)
                    or (name in ("b1", "b2") and value >= 1)):
                want = ("a finite number > 0" + (" (None: no clipping)" if name == "max_grad_norm" else "")
                        if positive else "in [0, 1)" if name in ("b1", "b2") else "a finite number >= 0")
                raise ValueError(f"TrainConfig.{name} must be {want}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.remat_policy is not None:
            try:
                known = isinstance(self.remat_policy, str) and resolve_remat_policy(self.remat_policy) is not None
            except ValueError:
                known = False
            if not known:
                raise ValueError(f"TrainConfig.remat_policy must be a jax.checkpoint_policies name or phi_jax's "
                                 f"{', '.join(REMAT_POLICIES)} (None: keep every activation), got "
                                 f"{self.remat_policy!r}")


def schedule(cfg: TrainConfig) -> optax.Schedule:
    decay = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, decay,
                                              end_value=cfg.learning_rate * cfg.final_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; weight decay only on matrices (not biases or LayerNorm)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [] if cfg.max_grad_norm is None else [optax.clip_by_global_norm(cfg.max_grad_norm)]
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def path_key(path) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model taken apart for training: `merge(trainable, frozen)` rebuilds it (inside jit too)."""

    graphdef: Any
    template: tuple  # ((path, abstract Variable), ...) of every parameter, trainable then frozen
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    rest: Any  # non-parameter state (dropout RNG keys and counts)

    def merge(self, trainable: dict, frozen: dict, rest=None) -> nnx.Module:
        values = {**frozen, **trainable}
        flat = [(p, v.replace(values[path_key(p)])) for p, v in self.template]
        rest = jax.tree.map(lambda x: x, self.rest if rest is None else rest)  # fresh Variables in this trace
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat), rest)


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param, *, train: bool = True,
                remat_policy: str | None = None) -> SplitModel:
    """Splits `model` (dropout switched on when `train`) into trainable / frozen parameters and the rest."""
    if remat_policy is not None:
        resolve_remat_policy(remat_policy)  # a ValueError naming it when it is unknown
        for _, m in nnx.iter_graph(model):
            if hasattr(m, "remat_policy"):
                m.remat_policy = remat_policy
    if train:
        model = nnx.view(model, only=nnx.Dropout, raise_if_not_found=False, deterministic=False)
    graphdef, train_state, frozen_state, rest = nnx.split(model, trainable, nnx.Param, ...)
    flat_t, flat_f = nnx.to_flat_state(train_state), nnx.to_flat_state(frozen_state)
    template = tuple((p, v) for p, v in list(flat_t) + list(flat_f))
    return SplitModel(graphdef, template, {path_key(p): v.get_value() for p, v in flat_t},
                      {path_key(p): v.get_value() for p, v in flat_f}, rest)


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and the number of targets. `logits: [B, T, V]`; `labels: [B, T]`, -100 ignored;
    token t predicts label t+1 (transformers' causal-LM convention). The labels shift, not the logits: slicing
    `logits[:, :-1]` would copy the largest activation of the step (and pad its gradient back)."""
    nll, valid = token_nll(logits, shift_labels(labels))  # [B, T]
    return jnp.sum(nll), jnp.sum(valid)


def make_loss_fn(split: SplitModel) -> Callable:
    """`loss_fn(trainable, frozen, batch, key) -> (nll_sum, count)`; `key` reseeds dropout. Without a key, a model
    whose dropout is on is a ValueError: its stored RNG state would give every step the same masks."""

    def loss_fn(trainable, frozen, batch, key):
        model = split.merge(trainable, frozen)
        if key is not None:
            # a model built with `nnx.Rngs(seed)` gives its Dropout layers forks of the "default" stream
            nnx.reseed(model, dropout=key, default=key)
        elif any(isinstance(m, nnx.Dropout) and m.rate > 0 and not m.deterministic for _, m in nnx.iter_graph(model)):
            raise ValueError("dropout is on (a rate > 0 in training mode) but the step got no key: pass a dropout "
                             "key per step (phi_jax.train.step.step_key(seed, step)), or build the model with "
                             "dropout 0 / split it with train=False")
        out = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return token_losses(out.logits, batch["labels"])

    return loss_fn


def grads_and_loss(split: SplitModel, trainable, frozen, batch, key, accum_steps: int = 1):
    """Gradients of the mean token loss over the whole batch: summed over `accum_steps` micro-batches and
    divided by the batch's target count.

    Without dropout (every pdrop 0, or `split_model(..., train=False)`) accumulation changes nothing but memory
    and float rounding. With dropout it changes the draw: micro-batch i takes its masks from
    `jax.random.split(key, accum_steps)[i]` (with `key=None`, every micro-batch reuses the model's own RNG
    state), so `accum_steps=2` gives another loss than `accum_steps=1` for the same key: the same
    distribution, other masks. A run is reproducible (and resumable) for a fixed `accum_steps`."""
    loss_fn = make_loss_fn(split)
    grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(p, frozen, b, k), has_aux=True)
    if accum_steps == 1:
        (nll, count), grads = grad_fn(trainable, batch, key)
    else:
        b = batch["input_ids"].shape[0]
        if b % accum_steps:
            raise ValueError(f"batch size {b} is not a multiple of accum_steps {accum_steps}")
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, b // accum_steps, *x.shape[1:]), batch)
        keys = None if key is None else jax.random.split(key, accum_steps)

        def body(carry, xs):
            g_sum, nll_sum, n_sum = carry
            mb, k = xs
            (nll, n), g = grad_fn(trainable, mb, k)
            return (jax.tree.map(jnp.add, g_sum, g), nll_sum + nll, n_sum + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, nll, count), _ = jax.lax.scan(body, (zeros, 0.0, 0), (micro, keys))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    return jax.tree.map(lambda g: g / denom, grads), nll / denom, count


def make_train_step(split: SplitModel, tx: optax.GradientTransformation, accum_steps: int = 1) -> Callable:
    """`step(state, frozen, batch, key) -> (state, metrics)`; metrics: loss, grad_norm, tokens (targets)."""

    def step(state, frozen, batch, key):
        grads, loss, count = grads_and_loss(split, state["params"], frozen, batch, key, accum_steps)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def init_state(split: SplitModel, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": split.trainable, "opt_state": tx.init(split.trainable)}


def step_key(seed: int, step: int) -> jax.Array:
    """The dropout key of global step `step`: a function of (seed, step) only, so resuming changes nothing."""
    return jax.random.fold_in(jax.random.key(seed), step)
