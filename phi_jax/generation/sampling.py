"""Token samplers: each is a frozen dataclass with `next_tokens(logits, rng) -> [B] int32`.

Sampling stays outside the model. A sampler is a pytree: its float settings (temperature,
top_p) are traced, so changing them does not compile again; `top_k` fixes a shape and is
static. Warpers apply in transformers' order and with its rules (`TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`): temperature, then top-k, which keeps every token tied
with the k-th largest logit (bf16 logits tie often), then top-p over what top-k kept.

    Greedy()                                          argmax
    Sampling(temperature=0.7, top_k=50, top_p=0.9)    all three combined
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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
      temperature: > 0 and finite in float32; `make_sampler` refuses one below float32's smallest normal number.
      top_k: keep the k most likely tokens and any tied with the k-th (None: all). Static: a new k compiles
        again.
      top_p: in (0, 1]; keep a token unless the tokens ranked at or below it hold <= 1 - top_p of the
        probability (transformers' TopPLogitsWarper; the most likely token is always kept). None: no nucleus.
    """

    temperature: jax.Array | float = 1.0
    top_p: jax.Array | float | None = None
    top_k: int | None = struct.field(pytree_node=False, default=None)

    def next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """`logits: [B, V]` -> `[B]` int32, drawn with `rng` from `softmax(self.filter_logits(logits))`.

        With top_k, the draw is over the k candidates alone unless a row holds a token tied with its k-th logit
        outside them (then over the whole vocabulary): drawing over 51200 ids costs ~2 ms per row on a CPU."""
        logits = self._scale(logits)  # [B, V]
        if self.top_k is None or self.top_k >= logits.shape[-1]:
            return jax.random.categorical(rng, self._nucleus(logits), axis=-1).astype(jnp.int32)
        vals, idx, whole = self.candidates(logits)

        def from_candidates():
            choice = jax.random.categorical(rng, vals, axis=-1)  # [B] index into the k
            return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]

        def from_everything():
            return jax.random.categorical(rng, self._nucleus(self._top_k(logits)), axis=-1)

        return jax.lax.cond(jnp.all(whole), from_candidates, from_everything).astype(jnp.int32)

    def candidates(self, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """top-k's candidates of scaled `logits: [B, V]` with the nucleus applied: `(vals [B, k], ids [B, k],
        whole [B])`; `whole[b]`: row b keeps no token outside them (none tied with the k-th is left out), so
        drawing from `vals` is drawing from `filter_logits`."""
        vals, idx = jax.lax.top_k(logits, self.top_k)  # [B, k], most likely first
        kth = jnp.min(vals, axis=-1, keepdims=True)  # (not vals[:, -1:]: XLA:CPU then sorts the whole row)
        whole = jnp.sum(logits == kth, axis=-1) == jnp.sum(vals == kth, axis=-1)  # [B]
        return self._nucleus(vals), idx, whole

    def filter_logits(self, logits: jax.Array) -> jax.Array:
        """`logits: [B, V]` -> float32 `[B, V]`: divided by the temperature, -inf where top-k or top-p drops a
        token. The kept set is transformers' except for ties at the top-p boundary, where transformers keeps
        whichever of the tied tokens its sort happens to put last and this keeps them all."""
        return self._nucleus(self._top_k(self._scale(logits)))

    def _scale(self, logits: jax.Array) -> jax.Array:
        """`logits: [B, V]` divided by the temperature, in float32. A row that this overflows (a temperature near
        float32's smallest normal: every logit to +-inf, NaN probabilities, a token that is not the most likely) is
        first shifted so that its largest logit is 0, which leaves its distribution as it is: the others go to
        -inf instead. Rows that do not overflow are exactly `logits / temperature`."""
        logits = logits.astype(jnp.float32)
        scaled = logits / self.temperature  # [B, V]
        overflow = jnp.any(jnp.isinf(scaled) & jnp.isfinite(logits), axis=-1, keepdims=True)  # [B, 1]
        shifted = (logits - jnp.max(logits, axis=-1, keepdims=True)) / self.temperature  # [B, V], all <= 0
        return jnp.where(overflow, shifted, scaled)

    def _top_k(self, logits: jax.Array) -> jax.Array:
        """-inf below the k-th largest of `logits: [B, V]`; ties with it stay."""
        if self.top_k is None or self.top_k >= logits.shape[-1]:
            return logits
        kth = jnp.min(jax.lax.top_k(logits, self.top_k)[0], axis=-1, keepdims=True)  # [B, 1]
        return jnp.where(logits < kth, -jnp.inf, logits)

    def _nucleus(self, logits: jax.Array) -> jax.Array:
        """top-p on `logits: [B, N]` (the vocabulary, or top-k's candidates): -inf where it drops a token.

        transformers drops a token when the tokens ranked at or below it hold <= 1 - top_p (and keeps the most
        likely one): it keeps token j when the tokens above it hold < top_p. That mass falls as the logit rises, so
        the kept tokens are those at or above the smallest logit v with mass(above v) < top_p, found by bisection
        over the float32 values in their bit order (32 steps, each a pass over the row): no sort of the row,
        which on a CPU took 15-19 ms for 51,200 ids (benchmarks/sampling.py). Tied tokens are kept or dropped
        together."""
        if self.top_p is None:
            return logits
        probs = jax.nn.softmax(logits, axis=-1)  # [B, N]
        keys = _ordered_bits(logits)  # [B, N] uint32, ordered as the values

        def step(_, bounds):  # invariant: mass(above hi) < top_p; the answer lies in [lo, hi]
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            ok = jnp.sum(jnp.where(keys > mid[:, None], probs, 0.0), axis=-1) < self.top_p
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

        _, smallest_kept = jax.lax.fori_loop(0, 32, step, (jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)))
        # top_p = 1 is no nucleus at all (transformers adds no warper), not "drop what has no mass"
        return jnp.where((keys < smallest_kept[:, None]) & (self.top_p < 1), -jnp.inf, logits)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (-inf lowest): flip every bit of negatives, the sign bit of others."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def make_sampler(do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> Greedy | Sampling:
    """Checks the options and builds a sampler; `do_sample=False` is greedy (the other options must be unset or
    at their "off" values: temperature 1, top_k 0 or None, top_p 1 or None). top_k=0 is no top-k filtering, as in
    transformers."""
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    for name, value in (("temperature", temperature), ("top_p", 1.0 if top_p is None else top_p)):
        if type(value) in (float, int):
            continue
        kind = np.asarray(value).dtype.kind if np.ndim(value) == 0 else None  # a str, None or an array: not a number
        if kind not in ("f", "i", "u") and not (kind == "V" and np.asarray(value).dtype == jnp.bfloat16):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(top_k, np.integer):
        top_k = int(top_k)
    if type(top_k) is int and top_k == 0:
        top_k = None  # transformers' top_k=0: no top-k filtering
    if not do_sample:
        if top_p is not None and type(top_p) in (float, int) and top_p == 1:
            top_p = None  # no nucleus (transformers adds no warper for top_p=1.0)
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("temperature, top_k and top_p apply only with do_sample=True "
                             f"(got temperature={temperature}, top_k={top_k}, top_p={top_p})")
        return Greedy()
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}" + (" (for greedy decoding use do_sample=False)"
                                                                          if temperature == 0 else ""))
    with np.errstate(over="ignore"):
        traced = np.float32(temperature)  # the value the sampler divides by
    if not np.isfinite(traced):  # inf, or past float32's range: every token equally likely, silently
        raise ValueError(f"temperature must be finite (at most {np.finfo(np.float32).max:.4g}), got {temperature}")
    if traced < np.finfo(np.float32).tiny:  # rounds to 0 (or a subnormal that XLA may flush to 0): NaN probabilities
        raise ValueError(f"temperature {temperature} is below float32's smallest normal number "
                         f"({np.finfo(np.float32).tiny:.4g}); for greedy decoding use do_sample=False")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, or 0 or None (no top-k filtering), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return Sampling(temperature=float(temperature), top_p=None if top_p is None else float(top_p), top_k=top_k)
