"""The one name table between phi_jax parameters and transformers' state-dict keys.

A parameter path equals the HF key but for its leaf name; Linear kernels are `[in, out]`
here and `[out, in]` in PyTorch, so they transpose.
"""

from __future__ import annotations

import re

# leaf name here -> (leaf name in HF, transposed?)
_LEAVES = {"kernel": ("weight", True), "embedding": ("weight", False), "scale": ("weight", False),
           "bias": ("bias", False)}

# Non-parameter buffers that older checkpoints (HF 4.x, Microsoft's originals) carry; skipped by name.
_BUFFER = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|cos_cached|sin_cached)$")
HEAD_PREFIXES = ("lm_head.", "score.")


def hf_key(path: tuple) -> tuple[str, bool]:
    """`('model', 'layers', 0, 'mlp', 'fc1', 'kernel')` -> `('model.layers.0.mlp.fc1.weight', True)`."""
    *modules, leaf = path
    if leaf not in _LEAVES:
        raise KeyError(f"no Hugging Face name for parameter {'/'.join(map(str, path))}")
    name, transpose = _LEAVES[leaf]
    return ".".join([*map(str, modules), name]), transpose


def is_buffer(key: str) -> bool:
    """True for keys of non-parameter buffers (`rotary_emb.inv_freq`, `cos_cached`) that loading skips."""
    return bool(_BUFFER.search(key))
