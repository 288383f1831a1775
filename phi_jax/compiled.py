"""A compiled (jax.jit) forward for inference: `compiled(model)(input_ids, ...)`.

The model is split into its graph definition (static) and the arrays of its Variables (traced) once;
later calls reuse that split (`phi_jax.compilation.SplitCache`): each call reads the Variables' current
arrays and checks every graph node's attributes (by identity) and every Variable's metadata against the
split, so weight updates (`var[...] = ...`, `nnx.update`, optimizers), `model.train()`/`model.eval()` and
replaced or added submodules are seen, for a few tenths of a millisecond of host time on a 32-layer model
instead of a full `nnx.split` (20-50 ms for phi-2). XLA compiles once per input shape (and per set of optional
arguments). Token ids are checked on the host before the jitted call, and so are the values of numpy labels
(labels already on a device only for shape and dtype, under jit: reading them back would cost a sync). A model
whose parameters live on a mesh of several devices (`from_pretrained(path, mesh=mesh)`) is traced under
`phi_jax.sharding.layout_of`: its rows split over the batch axes, its fused attention runs per shard.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from phi_jax.compilation import SplitCache, StaticGraph
from phi_jax.sharding import layout_of, traced_under
from phi_jax.modeling.inputs import check_input_ids
from phi_jax.modeling.model import (PhiForCausalLM, PhiForSequenceClassification, PhiForTokenClassification,
                                    PhiOutput, _check_class_labels)


@functools.partial(jax.jit, static_argnames=("static", "output_hidden_states", "layout"))
def _apply(static: StaticGraph, leaves, input_ids, attention_mask, position_ids, labels, output_hidden_states,
           layout=None):
    model = static.merge(leaves)
    kwargs = {} if labels is None else {"labels": labels}
    with traced_under(layout):
        return model(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states, **kwargs)


class CompiledForward:
    """Calls `model(input_ids, attention_mask, position_ids, labels=...)` under jax.jit."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self._split = SplitCache()

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, labels=None,
                 output_hidden_states: bool = False) -> PhiOutput:
        ids_mask = None  # ids at masked positions are never read (the model looks them up as 0)
        if attention_mask is not None and getattr(attention_mask, "shape", None) == getattr(input_ids, "shape", ()):
            ids_mask = attention_mask
        check_input_ids(input_ids, self.model.config.vocab_size, mask=ids_mask)
        if isinstance(labels, np.ndarray):
            _check_host_labels(self.model, input_ids, labels)
        static, leaves = self._split.split(self.model)
        return _apply(static, leaves, input_ids, attention_mask, position_ids, labels, output_hidden_states,
                      layout=layout_of(leaves))  # a model on a mesh: rows data-parallel, attention per shard


def _check_host_labels(model: nnx.Module, input_ids, labels: np.ndarray) -> None:
    """The model's own checks of `labels` (shape, dtype, range: a label outside [0, classes) other than -100 is a
    NaN or silently wrong loss), run on the host. Inside the jitted call labels are traced, so the model can check
    only their shape and dtype there; numpy labels are read here at the cost of one comparison per label. Labels
    already on a device (jax.Array) are not: reading them back would add a device-to-host sync to every call."""
    if isinstance(model, PhiForSequenceClassification):
        model._check_labels(labels, np.shape(input_ids)[0])
    elif isinstance(model, (PhiForCausalLM, PhiForTokenClassification)):
        classes = model.config.vocab_size if isinstance(model, PhiForCausalLM) else model.config.num_labels
        _check_class_labels(labels, np.shape(input_ids), classes)


def compiled(model: nnx.Module) -> CompiledForward:
    return CompiledForward(model)
