"""Logical axis names -> a device mesh `("data", "fsdp", "tensor")`.

Every parameter names its dimensions (`modeling.partitioning.axes`: vocab, embed, heads, kv_heads, mlp, norm,
classes); a rules table maps each name to mesh axes. The default table shards weights over `fsdp` (the
`embed` dimension) and splits heads, the MLP and the vocabulary over `tensor`; batches split over
`("data", "fsdp")`; activations (`modeling.partitioning.constrain`) keep rows over the batch axes and
logits' vocabulary over `tensor` while `rules_in_force` is entered. Override by passing your own table, e.g. `{**DEFAULT_RULES, "vocab": None}`.

A mesh axis that does not divide a dimension is dropped for that dimension (the parameter is replicated
along it), so any mesh shape works with any model; `spec_for` reports what it chose.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi_jax.modeling.partitioning import logical_spec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "classes": None,
    # activations (modeling.partitioning.constrain)
    "act_vocab": "tensor",
}


def parse_mesh(text: str) -> dict[str, int | None]:
    """`"data=1,fsdp=8,tensor=1"` -> `{"data": 1, "fsdp": 8, "tensor": 1}`: data and tensor default to 1, fsdp to
    None (`make_mesh` gives it the devices the others leave). Spaces around entries are ignored; an entry that is not
    NAME=SIZE with SIZE >= 1, or an axis named twice, is a ValueError naming it."""
    sizes: dict[str, int | None] = {"data": 1, "fsdp": None, "tensor": 1}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = (s.strip() for s in part.partition("="))
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES} and SIZE >= 1")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def make_mesh(data: int = 1, fsdp: int | None = None, tensor: int = 1, devices=None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh over `devices` (default: all); `fsdp=None` takes what is left. The sizes'
    product must equal the number of devices (a ValueError saying so)."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"mesh data={data} x tensor={tensor} does not divide the {len(devices)} devices (fsdp "
                             f"takes what they leave)")
        fsdp = len(devices) // (data * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} spans {data * fsdp * tensor} devices, but "
                         f"there are {len(devices)}: the sizes' product must equal the device count")
    arr = np.asarray(devices).reshape(data, fsdp, tensor)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def spec_for(names, shape, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> P:
    """The PartitionSpec of one array: each logical name through `rules`, keeping only mesh axes that divide
    the dimension (and that no earlier dimension used)."""
    return logical_spec(names, shape, dict(mesh.shape), rules)


def rules_in_force(mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """A context (enter it while tracing) in which the model's activation constraints apply: the abstract mesh
    and the logical rules, as `modeling.partitioning.constrain` reads them."""
    return traced_under((mesh.abstract_mesh, tuple(rules.items())))


def layout_of(arrays) -> tuple | None:
    """How to trace a model whose arrays are `arrays` (the first floating-point one is looked at), as a hashable
    value for a jit static argument: `(abstract mesh, rules)` when they live on a mesh of several devices, else
    None. The rules are those in force (`rules_in_force(mesh, your_rules)` around the call), else `DEFAULT_RULES`.
    `phi_jax.compiled` and `generate` trace under it (`traced_under`), so that a model loaded with
    `from_pretrained(path, mesh=mesh)` runs its rows data-parallel and its fused attention per shard. (A static
    argument, not only a context: jit's cache does not see the logical rules, so a program traced under other rules
    would be reused.)"""
    # the first parameter-like array (RNG keys and counts stay on one device, and may come first)
    first = next((a for a in arrays if getattr(a, "ndim", 0) and jnp.issubdtype(a.dtype, jnp.floating)), None)
    mesh = getattr(getattr(first, "sharding", None), "mesh", None)
    if not isinstance(mesh, Mesh) or mesh.size == 1:
        return None
    rules = spmd.get_logical_axis_rules() or tuple(DEFAULT_RULES.items())
    return mesh.abstract_mesh, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def traced_under(layout: tuple | None):
    """The context `layout_of` described (enter it inside the traced function); for None, one that does nothing."""
    stack = contextlib.ExitStack()
    if layout is not None:
        stack.enter_context(jax.sharding.use_abstract_mesh(layout[0]))
        stack.enter_context(nnx.logical_axis_rules(layout[1]))
    return stack


def _logical_names(var: nnx.Variable):
    return var.get_metadata().get("out_sharding")


def state_shardings(state, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """A tree like `state` (an nnx.State of Variables) holding each Variable's NamedSharding."""
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, spec_for(_logical_names(v), v.get_value().shape, mesh, rules))),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def path_shardings(tree, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> dict[tuple, NamedSharding]:
    """`{parameter path: NamedSharding}` for every parameter of a model or an (abstract) nnx.State."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return {p: NamedSharding(mesh, spec_for(_logical_names(v), v.get_value().shape, mesh, rules))
            for p, v in nnx.to_flat_state(state)}


def batch_sharding(mesh: Mesh, rules: Mapping = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes (default `("data", "fsdp")`), the rest replicated."""
    target = rules.get("batch")
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if mesh.shape[a] > 1)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> nnx.Module:
    """Moves every parameter of `model` (in place) onto its sharding; returns the model."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model


def place(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array as a global array with `sharding`: each device receives only its own slice (no replica
    of the whole tensor per device). In a multi-process run every process passes the same host array."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])
