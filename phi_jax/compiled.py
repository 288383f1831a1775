"""A compiled (jax.jit) forward for inference: `compiled(model)(input_ids, ...)`.

XLA compiles once per input shape (and per set of optional arguments). The traversal of the
model's graph is cached (`nnx.cached_partial`): about 20 ms of host time per call for phi-2
otherwise. The cache holds the model's Variables, so weight updates (an optimizer step,
`nnx.update`) are seen; structural changes (`model.train()` / `model.eval()`, swapping a submodule)
are not: call `compiled(model)` again after those. Token ids are checked on the host first.
"""

from __future__ import annotations

from flax import nnx

from phi_jax.model import PhiOutput, check_input_ids


@nnx.jit(static_argnames=("output_hidden_states",))
def _apply(model, input_ids, attention_mask, position_ids, labels, output_hidden_states):
    kwargs = {} if labels is None else {"labels": labels}
    return model(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states, **kwargs)


class CompiledForward:
    """Calls `model(input_ids, attention_mask, position_ids, labels=...)` under jax.jit."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self._call = nnx.cached_partial(_apply, model)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, labels=None,
                 output_hidden_states: bool = False) -> PhiOutput:
        check_input_ids(input_ids, self.model.config.vocab_size)
        return self._call(input_ids, attention_mask, position_ids, labels, output_hidden_states=output_hidden_states)


def compiled(model: nnx.Module) -> CompiledForward:
    return CompiledForward(model)
