"""KVCache: the preallocated key/value cache of a decode, as a pytree.

Slots run along the sequence axis. A batch of left-padded prompts fills slots `[0, T)`
(the pads are the leading slots of each row, masked); decode step i writes slot `T + i`.
`mask[b, s]` is True where slot s holds a real token, `index` is the next slot to write and
`positions[b]` the rotary position of row b's next token (its count of real tokens so far).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from phi_jax.config import PhiConfig
from phi_jax.modeling.partitioning import constrain


@struct.dataclass
class KVCache:
    """layers: per layer `(k, v)`, each `[B, S, K, H]`; mask: `[B, S]` bool; index: int32 scalar;
    positions: `[B]` int32."""

    layers: tuple[tuple[jax.Array, jax.Array], ...]
    mask: jax.Array
    index: jax.Array
    positions: jax.Array

    @classmethod
    def init(cls, config: PhiConfig, batch: int, length: int, dtype) -> "KVCache":
        """Zeros for `length` slots, no slot real yet. On a mesh with logical rules in force, rows split over the
        batch axes and key heads over the "kv_heads" rule's, as the attention reads them."""
        shape = (batch, length, config.num_key_value_heads, config.head_dim)  # [B, S, K, H]

        def zeros():
            return constrain(jnp.zeros(shape, dtype), ("batch", None, "kv_heads", None))
        layers = tuple((zeros(), zeros()) for _ in range(config.num_hidden_layers))
        return cls(layers=layers, mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32),
                   positions=jnp.zeros((batch,), jnp.int32))

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def check_room(self, num_tokens: int) -> None:
        """Raises ValueError when `num_tokens` new slots would not fit (only for a concrete `index`).

        `lax.dynamic_update_slice` clamps an out-of-range start, which would silently overwrite the
        last slots; every writer checks here (or, inside compiled loops, bounds its steps) first.
        """
        if isinstance(self.index, jax.core.Tracer):
            return
        end = int(self.index) + num_tokens
        if end > self.length:
            raise ValueError(f"{num_tokens} tokens from slot {int(self.index)} do not fit a cache of "
                             f"{self.length} slots")


def cache_bytes(config: PhiConfig, batch: int, length: int, dtype) -> int:
    """Bytes that `KVCache.init(config, batch, length, dtype)` holds in keys and values."""
    per = batch * length * config.num_key_value_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return 2 * config.num_hidden_layers * per
