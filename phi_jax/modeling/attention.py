"""PhiAttention, AttentionMask and `get_attention_fn`, the one place that chooses an attention implementation.

q/k/v are `[batch, seq, heads, head_dim]` at every boundary (B T N H; keys B S K H). The mask reaches
attention as an `AttentionMask` (segment ids, causal, query offset: the contract of
`phi_jax.kernels.reference`); the `xla` path expands it to a dense bool `[B, 1, T, S]` (True = attend).

`attn_implementation`:
  "xla"     the plain-jnp path below (default; exact parity with transformers).
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")` on CUDA for bf16/fp16 inputs. Elsewhere
            (CPU, TPU, or float32 inputs, which cuDNN's flash attention does not take) it falls back to the
            "xla" path: a documented fallback rather than an error, so one model (or one exported program)
            serves every platform.
  "pallas"  our kernels, chosen per platform when the program is lowered (`jax.lax.platform_dependent`):
            Mosaic GPU flash attention on CUDA (`phi_jax.kernels.flash_attention_gpu`), Mosaic TPU on TPU
            (`phi_jax.kernels.flash_attention_tpu`) and the TPU kernels in Pallas's interpreter on CPU (slow:
            for tests). Decode steps (at most DECODE_MAX_QUERIES queries against a cache) use flash-decoding:
            `phi_jax.kernels.decode_attention` on TPU and CPU, `phi_jax.kernels.decode_attention_gpu` (the
            Mosaic GPU forward kernel split over the keys) on CUDA.
  "auto"    "pallas" on GPU and TPU, "xla" on CPU.
Attention dropout (training with `attention_dropout > 0`) exists only on the "xla" path; the others raise.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from phi_jax.modeling.partitioning import axes, per_shard_attention
from phi_jax.modeling.layernorm import layer_norm, make_layer_norm, matmul_precision
from phi_jax.modeling.matmul import dot_general, projection_result_type
from phi_jax.modeling.projection import Linear, project
from phi_jax.modeling.rotary import apply_partial_rotary
from phi_jax.kernels.decode_attention import decode_attention
from phi_jax.kernels.decode_attention_gpu import decode_attention_gpu
from phi_jax.kernels.flash_attention_gpu import flash_attention_gpu
from phi_jax.kernels.flash_attention_tpu import flash_attention_tpu
from phi_jax.modeling.mask import AttentionMask
from phi_jax.modeling.remat import ATTENTION_RESIDUALS

ATTN_IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")
DECODE_MAX_QUERIES = 16  # with a cache, calls with at most this many queries use the decode kernel


@jax.custom_jvp
def _softmax(x: jax.Array) -> jax.Array:
    """`jax.nn.softmax(x, axis=-1)`, the same forward, with the derivative written as y * (dx - sum(y * dx)).

    jax 0.10's `jax.nn.softmax` differentiates through its exp / sum division unless the global flag
    `jax_softmax_custom_jvp` is set, which a library must not set for its users: that backward carries the
    1/sum^2 term of the quotient rule through the score-sized tensors.
    """
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@_softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _softmax(x)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


def _grouped_products(heads_major: bool):
    """(scores, weighted) for `_attend_block`: q `[B, T, K, G, H]`, k and v `[B, S, K, H]`, probabilities and scores
    `[B, K, G, T, S]`; the weighted sum is `[B, T, K, G, H]`. Both forms compute the same products. `heads_major`
    moves the heads before the positions first (transposed copies of q, k, v and the output): XLA's CPU backend
    then runs plain batched matrix products, where with the positions in the middle it runs them on strided
    operands and results, 1.15-1.3x slower for the forward in most runs (benchmarks/cpu_attention.py). Elsewhere the
    products keep the layout they were measured with on the GPU."""

    def scores(q, k):
        precision = matmul_precision(q.dtype)
        kw = dict(preferred_element_type=jnp.float32, precision=precision, _dot_general=dot_general)
        if heads_major:
            return jnp.einsum("BKGTH,BKSH->BKGTS", q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), **kw)
        return jnp.einsum("BTKGH,BSKH->BKGTS", q, k, **kw)

    def weighted(probs, v):
        precision = matmul_precision(v.dtype)
        if heads_major:
            out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v.transpose(0, 2, 1, 3), precision=precision)
            return out.transpose(0, 3, 1, 2, 4)
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, precision=precision)
    return scores, weighted


_CPU_PRODUCTS, _PRODUCTS = _grouped_products(True), _grouped_products(False)


def _attend_block(q, k, v, mask, dropout):
    """Attention of one query block. q: `[B, T, N, H]`; k, v: `[B, S, K, H]`; mask: `[B, 1, T, S]`.

    A masked key never reaches a query, whatever it holds (NaN and inf included): its score is replaced by the
    float32 minimum before the softmax, so its probability is exactly 0 (exp(min - max) underflows) for every query
    that sees some key; its value is replaced by 0 wherever no query of the block sees it (padding, unwritten cache
    slots), since 0 * NaN would still be NaN. A query that sees no key gives zeros. The two products take the
    layout of `_grouped_products` chosen for the platform when the program is lowered.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jax.lax.platform_dependent(q, k, cpu=_CPU_PRODUCTS[0], default=_PRODUCTS[0]) * (h ** -0.5)
    # A finite floor (not -inf): a fully masked row stays NaN-free (and is zeroed below).
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, K, G, T, S]
    probs = _softmax(scores).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    seen = jnp.any(mask, axis=(1, 2))  # [B, S]: keys some query of this block sees
    v = jnp.where(seen[:, :, None, None], v, jnp.zeros((), v.dtype))  # [B, S, K, H]
    out = jax.lax.platform_dependent(probs, v, cpu=_CPU_PRODUCTS[1], default=_PRODUCTS[1])  # [B, T, K, G, H]
    sees_any = jnp.any(mask, axis=-1)[:, 0, :, None, None, None]  # [B, T, 1, 1, 1]
    out = jnp.where(sees_any, out, jnp.zeros((), out.dtype))  # a query that sees nothing: zeros
    return out.reshape(b, t, n, h)


def attend_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal: bool = False,
               dropout: Callable[[jax.Array], jax.Array] | None = None, max_blocks: int = 8,
               min_block: int = 128) -> jax.Array:
    """Plain-jnp scaled dot-product attention with grouped keys; softmax in float32.

    Args:
      q: `[B, T, N, H]`; k, v: `[B, S, K, H]` with N a multiple of K; mask: `[B, 1, T, S]` bool.
      causal: the caller promises that `mask` already hides key s > query t (T == S, no offset).
        Long sequences are then split into at most `max_blocks` query blocks, each attending only to
        the keys up to its end: about half the score and softmax work of the full square.
      dropout: applied to the attention probabilities (training only).
    Returns:
      `[B, T, N, H]` in q's dtype.
    """
    t, s = q.shape[1], k.shape[1]
    if not causal or t != s or t < 2 * min_block:
        return _attend_block(q, k, v, mask, dropout)
    block = max(min_block, -(-t // max_blocks))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outs.append(_attend_block(q[:, start:end], k[:, :end], v[:, :end], mask[:, :, start:end, :end], dropout))
    return jnp.concatenate(outs, axis=1)  # [B, T, N, H]


def _check_no_dropout(dropout, name: str) -> None:
    if dropout is not None and not dropout.deterministic:
        raise ValueError(f"attn_implementation={name!r} has no attention dropout; use 'xla' to train with "
                         f"attention_dropout > 0")


def attend_masked_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                      dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The "xla" implementation: `attend_xla` on the dense mask."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    return attend_xla(q, k, v, mask.dense(b, t, s), causal=mask.is_square_causal(t, s), dropout=dropout)


def _is_decode(q, mask: AttentionMask) -> bool:
    return mask.q_offset is not None and q.shape[1] <= DECODE_MAX_QUERIES


def attend_pallas(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, dropout=None) -> jax.Array:
    """The "pallas" implementation: our kernels, picked per platform at lowering time."""
    _check_no_dropout(dropout, "pallas")
    decode = _is_decode(q, mask)

    def cpu(q, k, v, mask):
        if decode:
            return decode_attention(q, k, v, **mask.kernel_kwargs(), interpret=True)
        return flash_attention_tpu(q, k, v, **mask.kernel_kwargs(), interpret=True)

    def tpu(q, k, v, mask):
        if decode:
            return decode_attention(q, k, v, **mask.kernel_kwargs())
        return flash_attention_tpu(q, k, v, **mask.kernel_kwargs())

    def cuda(q, k, v, mask):
        if decode:
            return decode_attention_gpu(q, k, v, **mask.kernel_kwargs())
        return flash_attention_gpu(q, k, v, **mask.kernel_kwargs())

    return jax.lax.platform_dependent(q, k, v, mask, cpu=cpu, cuda=cuda, tpu=tpu)


def attend_auto(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, dropout=None) -> jax.Array:
    """The "auto" implementation: pallas on GPU and TPU, xla on the CPU."""
    _check_no_dropout(dropout, "auto")
    return jax.lax.platform_dependent(
        q, k, v, mask,
        cpu=lambda q, k, v, mask: attend_masked_xla(q, k, v, mask),
        default=lambda q, k, v, mask: attend_pallas(q, k, v, mask))


def _cudnn(q, k, v, mask: AttentionMask):
    """cuDNN flash attention. Without padding or offset, its own causal mask; else the contract's mask, where a
    row that sees nothing is given every key (finite, and with a zero output cotangent no gradient) and zeroed.

    jax checks for cuDNN when it traces this; a host without it (a CPU machine exporting for CUDA) gets the xla
    path in the CUDA branch too."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    try:
        if mask.q_segment_ids is None and mask.kv_segment_ids is None and mask.is_square_causal(t, s):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        vis = mask.dense(b, t, s)  # [B, 1, T, S]
        seen = jnp.any(vis, axis=-1)  # [B, 1, T]
        out = jax.nn.dot_product_attention(q, k, v, mask=vis | ~seen[..., None], implementation="cudnn")
    except RuntimeError as e:  # "cuDNN is not detected."
        if "cuDNN" not in str(e):
            raise
        return attend_masked_xla(q, k, v, mask)
    return jnp.where(seen[:, 0, :, None, None], out, jnp.zeros((), out.dtype))


def attend_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, dropout=None) -> jax.Array:
    """The "cudnn" implementation: cuDNN on CUDA for bf16/fp16, the xla path elsewhere (see the module doc)."""
    _check_no_dropout(dropout, "cudnn")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return attend_masked_xla(q, k, v, mask)
    return jax.lax.platform_dependent(
        q, k, v, mask, cuda=_cudnn, default=lambda q, k, v, mask: attend_masked_xla(q, k, v, mask))


def _named_residuals(fn: Callable, name: str) -> Callable:
    """`fn` (a fused implementation) with its VJP residuals named `ATTENTION_RESIDUALS`, so that the remat policy
    `dots_and_attention_saveable` keeps them instead of running the attention forward again in the backward (see
    phi_jax/modeling/remat.py). Values and gradients are `fn`'s: the backward is `fn`'s own VJP."""

    @jax.custom_vjp
    def attend(q, k, v, mask):
        return fn(q, k, v, mask)

    def fwd(q, k, v, mask):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        # the residuals are the leaves of vjp (a jax.tree_util.Partial), each named for the policy
        return out, jax.tree.map(lambda r: checkpoint_name(r, ATTENTION_RESIDUALS), vjp)

    def bwd(vjp, g):
        return (*vjp(g), None)  # the mask (ids, offsets) has no cotangent

    attend.defvjp(fwd, bwd)

    def wrapped(q, k, v, mask, *, dropout=None):
        _check_no_dropout(dropout, name)
        # the output too: the output projection's weight gradient reads it (else the forward runs again for it)
        return checkpoint_name(attend(q, k, v, mask), ATTENTION_RESIDUALS)
    return wrapped


# pallas and auto run per shard on a mesh (their kernels are custom calls XLA cannot partition); cuDNN's call comes
# with JAX's own partitioning rules.
_ATTENTION_FNS = {"xla": attend_masked_xla, "cudnn": _named_residuals(attend_cudnn, "cudnn"),
                  "pallas": _named_residuals(per_shard_attention(attend_pallas), "pallas"),
                  "auto": _named_residuals(per_shard_attention(attend_auto), "auto")}


def get_attention_fn(attn_implementation: str):
    """Maps the `attn_implementation` string to `fn(q, k, v, mask: AttentionMask, *, dropout=None)`, once, at
    construction."""
    if attn_implementation not in _ATTENTION_FNS:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; "
                         f"expected one of {ATTN_IMPLEMENTATIONS}")
    return _ATTENTION_FNS[attn_implementation]


class PhiAttention(nnx.Module):
    """Biased q/k/v/dense projections, optional per-head q/k LayerNorm, partial rotary, GQA."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, *, qk_layernorm: bool,
                 layer_norm_eps: float, attention_dropout: float, attn_implementation: str,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.attn_fn = get_attention_fn(attn_implementation)
        # float32 accumulation, rounded once to the compute dtype in the product (as torch's bf16 Linear; see
        # `projection_result_type`). Applied through `project`, which keeps a batch-1 decode row a matrix product on
        # XLA:GPU (see modeling/projection.py).
        self.dtype = dtype
        linear = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, precision=matmul_precision(dtype),
                      preferred_element_type=projection_result_type(dtype), dot_general=dot_general, rngs=rngs)
        self.q_proj = Linear(hidden_size, num_heads * self.head_dim, **linear,
                             kernel_metadata=axes("embed", "heads"), bias_metadata=axes("heads"))
        self.k_proj = Linear(hidden_size, num_kv_heads * self.head_dim, **linear,
                             kernel_metadata=axes("embed", "kv_heads"), bias_metadata=axes("kv_heads"))
        self.v_proj = Linear(hidden_size, num_kv_heads * self.head_dim, **linear,
                             kernel_metadata=axes("embed", "kv_heads"), bias_metadata=axes("kv_heads"))
        self.dense = Linear(num_heads * self.head_dim, hidden_size, **linear,
                            kernel_metadata=axes("heads", "embed"), bias_metadata=axes("norm"))
        if qk_layernorm:
            self.q_layernorm = make_layer_norm(self.head_dim, layer_norm_eps, param_dtype, rngs)
            self.k_layernorm = make_layer_norm(self.head_dim, layer_norm_eps, param_dtype, rngs)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.attn_dropout = (nnx.Dropout(attention_dropout, deterministic=True, rngs=rngs)
                             if attention_dropout else None)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask,
                 cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None):
        """
        Args:
          x: `[B, T, D]`; cos, sin: `[B, T, R]`; mask: who sees whom (queries T, keys S).
          cache: optional `(k, v)`, each `[B, S, K, H]`; this call's keys are written at `cache_index`.
        Returns:
          `([B, T, D], new_cache or None)`.
        """
        b, t, _ = x.shape
        q = project(self.q_proj, x).astype(self.dtype).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
        k = project(self.k_proj, x).astype(self.dtype).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = project(self.v_proj, x).astype(self.dtype).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        if self.q_layernorm is not None:
            q = layer_norm(self.q_layernorm, q)
            k = layer_norm(self.k_layernorm, k)
        q = apply_partial_rotary(q, cos, sin)
        k = apply_partial_rotary(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)  # [B, S, K, H]
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)  # [B, S, K, H]
            new_cache = (k, v)
        out = self.attn_fn(q, k.astype(q.dtype), v.astype(q.dtype), mask, dropout=self.attn_dropout)
        return project(self.dense, out.reshape(b, t, self.num_heads * self.head_dim)).astype(self.dtype), new_cache
