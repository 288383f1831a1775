"""Logical axis names for parameters and activations; `phi_jax.sharding` maps them onto a device mesh.

Parameters name their dimensions at creation (`axes(...)` metadata: vocab, embed, heads, kv_heads, mlp, norm,
classes). Activations name theirs through `constrain(x, names)` (batch, act_vocab, None):
a sharding constraint that is active only while a mesh is set (`jax.set_mesh`) and logical rules are in force
(`nnx.logical_axis_rules`); otherwise `x` passes through unchanged, so the model itself knows no mesh.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec as P


def axes(*names: str | None) -> dict:
    """Parameter metadata naming each dimension's logical axis.

    `eager_sharding=False`: a model built without a mesh stays unsharded; the names are only metadata.
    """
    return dict(out_sharding=names, eager_sharding=False)


def logical_spec(names, shape, mesh_shape: Mapping[str, int], rules: Mapping) -> P:
    """Each logical name through `rules` (name -> mesh axis, tuple of axes or None), keeping only mesh axes that
    divide the dimension and that no earlier dimension used."""
    used, spec = set(), []
    for name, size in zip(names or (None,) * len(shape), shape):
        target = rules.get(name) if name is not None else None
        wanted = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for a in wanted:
            n = mesh_shape.get(a, 1)
            if a in used or n == 1 or size % (math.prod(mesh_shape[k] for k in kept) * n):
                continue
            kept.append(a)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh and rules; a no-op without them."""
    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, dict(mesh.shape), dict(rules)))
