"""AttentionMask: who sees whom, as the kernels take it (segment ids, causal, query offset; the contract of
`phi_jax.kernels.reference`), and `make_attention_mask`, which turns the model's `attention_mask` into it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from phi_jax.kernels.reference import visible


@struct.dataclass
class AttentionMask:
    """Who sees whom, in the kernels' terms (`phi_jax.kernels.reference`), instead of a dense mask.

    q_segment_ids: `[B, T]` int32 or None; kv_segment_ids: `[B, S]` int32 or None (0 = padding key).
    q_offset: None when the queries are the keys (no cache: a static zero), else the first query's slot
      (int or traced int32 scalar).
    causal: static.
    Query t of row b sees key s when s <= q_offset + t (causal), kv_segment_ids[b, s] != 0 and
    q_segment_ids[b, t] == kv_segment_ids[b, s].
    """

    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_offset: jax.Array | int | None = None
    causal: bool = struct.field(pytree_node=False, default=True)

    @property
    def offset(self):
        return 0 if self.q_offset is None else self.q_offset

    def kernel_kwargs(self) -> dict:
        """The keyword arguments of every kernel in phi_jax/kernels."""
        return dict(q_segment_ids=self.q_segment_ids, kv_segment_ids=self.kv_segment_ids, causal=self.causal,
                    q_offset=self.offset)

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array:
        """The bool mask `[B, 1, T, S]` (True = attend) for the xla path."""
        return visible(batch, q_len, kv_len, q_segment_ids=self.q_segment_ids, kv_segment_ids=self.kv_segment_ids,
                       causal=self.causal, q_offset=self.offset)[:, None]

    def is_square_causal(self, q_len: int, kv_len: int) -> bool:
        """Statically known: causal, queries == keys, no offset (attend_xla may then skip future key blocks)."""
        return self.causal and self.q_offset is None and q_len == kv_len


def _fill_padding(ids: jax.Array) -> jax.Array:
    """`[B, S]` segment ids with each 0 (padding) replaced by the id of the last nonzero slot before it (0 if none)."""
    slots = jnp.arange(ids.shape[1], dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(ids != 0, slots, -1), axis=1)  # [B, S]: last real slot at or before each
    return jnp.where(last >= 0, jnp.take_along_axis(ids, jnp.maximum(last, 0), axis=1), 0)


def make_attention_mask(attention_mask: jax.Array | None, q_len: int, q_offset=None) -> AttentionMask:
    """The model's `attention_mask` as the kernels' segment ids.

    Args:
      attention_mask: `[B, S]` over the key slots (the cache slots when decoding), or None. 0/False marks
        padding; 1/True a real token; values > 1 are packed-document ids (a token sees only earlier tokens
        of its own document), so 1, 1, 2, 2, 2, 0 packs two documents and a pad into one row.
      q_len: T, the number of queries; they sit at slots `[q_offset, q_offset + T)`.
      q_offset: None without a cache (queries are the keys), else the first query's slot (int or traced).
    Returns:
      AttentionMask whose query ids are the mask at the query slots, except that a padding query takes the id of
      the last real slot at or before it: as in transformers (whose mask hides padding keys, never queries), a
      padding query after a real token sees the real keys up to it, so its output (and a sequence classifier's
      score there, when the ids there are not pad_token_id) is transformers'. A padding query before any real
      token sees nothing (zeros, as transformers' sdpa gives).
    """
    if attention_mask is None:
        return AttentionMask(q_offset=q_offset)
    kv_ids = attention_mask.astype(jnp.int32)  # [B, S]
    q_ids = _fill_padding(kv_ids)  # [B, S]
    if q_offset is not None:
        q_ids = jax.lax.dynamic_slice_in_dim(q_ids, q_offset, q_len, axis=1)  # [B, T]
    return AttentionMask(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset)
