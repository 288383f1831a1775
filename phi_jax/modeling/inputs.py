"""Checks of concrete inputs on the host, before any jitted call (JAX gathers would clamp bad ids silently)."""

from __future__ import annotations

import jax
import numpy as np


def check_input_ids(input_ids, vocab_size: int, mask=None) -> None:
    """Raises ValueError for a token id outside [0, vocab_size) (a JAX gather would clamp it silently).

    `mask`: optional `[B, T]` bool, True for real tokens; ids at masked positions are not checked (the
    model never reads them). Traced ids cannot be inspected; they are checked where they enter as concrete
    arrays.
    """
    if isinstance(input_ids, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if mask is not None:
        bad &= np.asarray(mask).astype(bool)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[pos])} at position {pos} is outside [0, {vocab_size}) (vocab_size)")
