"""`generate` / `generate_stream` as methods of PhiForCausalLM (the way transformers' models inherit a
generation mixin): this module imports no model class, so the dependency points from the model down to here."""

from __future__ import annotations


class GenerationMixin:
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Prompt + new tokens `[B, T + max_new_tokens]`; see `phi_jax.generation.generate.generate`."""
        from phi_jax.generation.generate import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    def generate_stream(self, input_ids, attention_mask=None, **kwargs):
        """Yields new tokens `[B]` as produced; see `phi_jax.generation.generate.generate_stream`."""
        from phi_jax.generation.generate import generate_stream
        return generate_stream(self, input_ids, attention_mask, **kwargs)
