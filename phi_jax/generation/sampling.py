"""Token samplers: each is a frozen dataclass with `next_tokens(logits, rng) -> [B] int32`.

Sampling stays outside the model. A sampler is a pytree: its float settings (temperature,
top_p) are traced, so changing them does not compile again; `top_k` fixes a shape and is
static. Warpers apply in transformers' order: temperature, then top-k, then top-p.

    Greedy()                                          argmax
    Sampling(temperature=0.7, top_k=50, top_p=0.9)    all three combined
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Greedy:
    """The most likely token (ties: the lowest id, as torch's argmax)."""

    def next_tokens(self, logits: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`logits: [B, V]` -> `[B]` int32."""
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@struct.dataclass
class Sampling:
    """Draws from softmax(logits / temperature), restricted to the top_k most likely tokens and then to
    the nucleus: the smallest set of most likely tokens whose probability reaches top_p.

    Attributes:
      temperature: > 0.
      top_k: keep the k most likely tokens (None: all). Static: a new k compiles again.
      top_p: in (0, 1]; keep a token when the probability of the tokens ranked above it is < top_p
        (transformers' TopPLogitsWarper; the most likely token is always kept). None: no nucleus.
    """

    temperature: jax.Array | float = 1.0
    top_p: jax.Array | float | None = None
    top_k: int | None = struct.field(pytree_node=False, default=None)

    def next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """`logits: [B, V]` -> `[B]` int32, drawn with `rng`."""
        logits = logits.astype(jnp.float32) / self.temperature  # [B, V]
        if self.top_k is None and self.top_p is None:
            return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
        k = logits.shape[-1] if self.top_k is None else min(self.top_k, logits.shape[-1])
        vals, idx = jax.lax.top_k(logits, k)  # [B, k] sorted, most likely first
        if self.top_p is not None:
            probs = jax.nn.softmax(vals, axis=-1)
            above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
            vals = jnp.where(above < self.top_p, vals, -jnp.inf)
        choice = jax.random.categorical(rng, vals, axis=-1)  # [B] index into the k candidates
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def make_sampler(do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> Greedy | Sampling:
    """Checks the options and builds a sampler; `do_sample=False` is greedy (the other options must be unset)."""
    if not do_sample:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("temperature, top_k and top_p apply only with do_sample=True "
                             f"(got temperature={temperature}, top_k={top_k}, top_p={top_p})")
        return Greedy()
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return Sampling(temperature=float(temperature), top_p=None if top_p is None else float(top_p), top_k=top_k)
