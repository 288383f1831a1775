"""Checks of concrete inputs on the host, before any jitted call (JAX gathers would clamp bad ids silently)."""

from __future__ import annotations

import jax
import numpy as np

IGNORE_INDEX = -100  # as phi_jax.modeling.losses (not imported: this module stays free of the model's imports)


def check_array(name: str, value) -> None:
    """TypeError unless `value` is an array (numpy, JAX or a tracer): a Python list would otherwise fail deep
    inside JAX (or, under jit, become a pytree of scalars)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an array (numpy or jax.numpy), got {type(value).__name__}")


def check_input_ids(input_ids, vocab_size: int, mask=None) -> None:
    """Raises ValueError for a token id outside [0, vocab_size) (a JAX gather would clamp it silently).

    `mask`: optional `[B, T]` bool, True for real tokens; ids at masked positions are not checked (the
    model never reads them). A mask of another dtype is checked as an `attention_mask` (`check_attention_mask`).
    Traced ids cannot be inspected; they are checked where they enter as concrete arrays.
    """
    check_array("input_ids", input_ids)
    if isinstance(input_ids, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            check_attention_mask(mask)
        bad &= mask.astype(bool)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[pos])} at position {pos} is outside [0, {vocab_size}) (vocab_size)")


def check_attention_mask(attention_mask) -> None:
    """Raises ValueError for an `attention_mask` value other than 0 (padding), 1 (a real token) or a packed-document
    id > 1: a negative, fractional or NaN value would otherwise be read silently (0.5 as padding, where transformers
    reads it as a real token). Bool masks and traced masks pass unchecked."""
    if attention_mask is None or isinstance(attention_mask, jax.core.Tracer):
        return
    check_array("attention_mask", attention_mask)
    mask = np.asarray(attention_mask)
    kind = mask.dtype.kind
    if kind in "bu":  # bool, unsigned
        return
    if kind == "i":
        bad = mask < 0
    elif kind == "f" or mask.dtype == jax.numpy.bfloat16:
        bad = ~(np.isfinite(mask) & (mask >= 0) & (mask == np.floor(mask)))
    else:
        raise ValueError(f"attention_mask must be bool or integers, got dtype {mask.dtype}")
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"attention_mask holds {mask[pos].item()!r} at position {pos}; expected 0 (padding), 1 (a "
                         "real token) or a packed-document id > 1")


def check_labels(labels, num_classes: int, name: str = "labels") -> None:
    """Raises ValueError for a class label outside [0, num_classes) other than -100 (ignored): the loss would be
    NaN (transformers raises). Traced labels pass unchecked."""
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    bad = ((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} {int(values[pos])} at position {pos} is outside [0, {num_classes}) and not "
                         f"{IGNORE_INDEX} (ignored)")
