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


def per_shard_attention(fn):
    """`fn(q, k, v, mask)` (q `[B, T, N, H]`, k and v `[B, S, K, H]`, an `AttentionMask`) run on each device's
    rows and heads under `jax.shard_map` while a mesh and logical rules are in force; unchanged otherwise.

    A fused kernel is a custom call that XLA cannot partition: left to the partitioner, every device would gather
    the whole batch's q, k and v and run the attention of every row. Rows split over the "batch" rule's axes;
    heads over the "heads" rule's axes when the same axes divide both the query and the key heads (each device
    then holds whole groups of grouped-query heads), else they stay whole. The mask's segment ids follow the rows;
    its query offset is one scalar for all.
    """

    def sharded(q, k, v, mask):
        rules = spmd.get_logical_axis_rules()
        mesh = jax.sharding.get_abstract_mesh()
        if not rules or mesh.empty:
            return fn(q, k, v, mask)
        shape, rules = dict(mesh.shape), dict(rules)
        q_spec = logical_spec(("batch", None, "heads", None), q.shape, shape, rules)
        kv_spec = logical_spec(("batch", None, "heads", None), k.shape, shape, rules)
        if q_spec[2] != kv_spec[2]:  # the key heads do not split like the query heads: keep the heads whole
            q_spec = kv_spec = logical_spec(("batch", None, None, None), q.shape, shape, rules)
        rows = P(q_spec[0], None)
        names = ("q_segment_ids", "kv_segment_ids", "q_offset")
        arrays = {n: getattr(mask, n) for n in names if isinstance(getattr(mask, n), jax.Array)}
        specs = {n: (P() if n == "q_offset" else rows) for n in arrays}

        def body(q, k, v, arrays):
            return fn(q, k, v, mask.replace(**arrays))
        return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, specs), out_specs=q_spec,
                             check_vma=False)(q, k, v, arrays)
    return sharded
