"""Losses with transformers' conventions (labels of -100 are ignored; causal labels shift inside)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def token_nll(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood of each label, 0 where ignored; the mask of counted labels), in float32.
    `logits: [..., V]`, `labels: [...]`.

    logsumexp(logits) - logits[label], the label's logit picked by a one-hot compare rather than a gather: the
    gradient (softmax - one-hot) is elementwise work on the logits, with no scatter into a `[..., V]` array and
    no log-probability tensor kept for the backward. A label outside [0, V) (and not ignored) gives NaN, as the
    gather did for a label >= V: a bad label shows in the loss rather than passing as a logit of 0.
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.asarray(labels)  # numpy int64 labels become JAX's int32 here, not in arange (a UserWarning)
    valid = labels != ignore_index
    hit = jnp.arange(logits.shape[-1], dtype=labels.dtype) == labels[..., None]  # [..., V]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    picked = jnp.where((labels >= 0) & (labels < logits.shape[-1]), picked, jnp.nan)
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0), valid


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy over labels != ignore_index. `logits: [..., V]`, `labels: [...]`."""
    nll, valid = token_nll(logits, labels, ignore_index)
    return jnp.sum(nll) / jnp.sum(valid)


def shift_labels(labels: jax.Array) -> jax.Array:
    """`[B, T]` labels of next-token prediction: position t gets label t+1, the last position none."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Token t predicts label t+1, as transformers' ForCausalLMLoss. `logits: [B, T, V]`, `labels: [B, T]`."""
    return cross_entropy(logits, shift_labels(labels))


def sequence_classification_loss(pooled: jax.Array, labels: jax.Array, problem_type: str | None) -> jax.Array:
    """transformers' ForSequenceClassificationLoss; `pooled: [B, C]`."""
    num_labels = pooled.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    pooled = pooled.astype(jnp.float32)
    if problem_type == "regression":
        if num_labels == 1:
            return jnp.mean((jnp.squeeze(pooled) - jnp.squeeze(labels)) ** 2)
        return jnp.mean((pooled - labels) ** 2)
    if problem_type == "single_label_classification":
        return cross_entropy(pooled.reshape(-1, num_labels), labels.reshape(-1))
    # multi-label: BCE with logits, mean over all elements.
    labels = labels.astype(jnp.float32)
    return jnp.mean(jnp.maximum(pooled, 0) - pooled * labels + jnp.log1p(jnp.exp(-jnp.abs(pooled))))
