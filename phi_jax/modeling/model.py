"""PhiModel and its heads: PhiForCausalLM, PhiForSequenceClassification, PhiForTokenClassification.

Module paths equal transformers' state-dict keys (`model.layers.0.self_attn.q_proj`, ...);
Linear kernels are stored `[in, out]` (transposed once at load).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from phi_jax.config import PhiConfig
from phi_jax.modeling.layer import PhiDecoderLayer
from phi_jax.modeling.partitioning import axes, constrain
from phi_jax.modeling.layernorm import layer_norm, make_layer_norm, matmul_precision
from phi_jax.modeling.matmul import dot_general
from phi_jax.modeling.projection import over_rows
from phi_jax.modeling.losses import causal_lm_loss, cross_entropy, sequence_classification_loss
from phi_jax.modeling.inputs import check_array, check_attention_mask, check_input_ids, check_labels
from phi_jax.modeling.mask import make_attention_mask
from phi_jax.modeling.remat import remat_policy
from phi_jax.modeling.rotary import cos_sin
from phi_jax.generation.mixin import GenerationMixin
from phi_jax.loading import PretrainedMixin


def _embed(embed: nnx.Embed, input_ids: jax.Array) -> jax.Array:
    """`nnx.Embed`'s lookup, in its compute dtype. On a mesh (logical rules in force) the table is gathered whole,
    as FSDP gathers every weight before use, and each device looks up its own rows: left to itself, XLA's SPMD
    partitioner replicated the lookup of the whole batch on every device ("involuntary full rematerialization")."""
    table = constrain(embed.embedding[...], (None, None))  # [V, D]
    ids = constrain(input_ids, ("batch", None))  # [B, T]
    return jnp.take(table, ids, axis=0).astype(embed.dtype or table.dtype)  # [B, T, D]


@struct.dataclass
class PhiOutput:
    """What every model call returns.

    logits: `[B, T, V]` (causal LM), `[B, C]` (sequence classification) or `[B, T, C]` (token classification);
    `None` for PhiModel. last_hidden_state: `[B, T, D]`. hidden_states: the embeddings and each layer's output
    (the last one after the final LayerNorm, as transformers reports them) when requested. cache: the updated
    key/value cache when one was passed.
    """

    last_hidden_state: jax.Array
    logits: jax.Array | None = None
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    cache: Any = None


def _check_mask(name: str, mask, shape) -> None:
    if mask is None:
        return
    check_array(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def _check_class_labels(labels, shape, num_classes: int) -> None:
    """Labels of the causal-LM and token-classification losses: `shape` ints, each in [0, num_classes) or -100
    (values checked on the host when concrete; shape and dtype also under jit)."""
    _check_mask("labels", labels, shape)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers (class ids, -100 ignored), got dtype {labels.dtype}")
    check_labels(labels, num_classes)


def build_mask(attention_mask: jax.Array | None, batch: int, q_len: int, kv_len: int, q_offset) -> jax.Array:
    """The dense mask `[B, 1, T, S]` bool of `make_attention_mask` (query t at slot q_offset + t sees real key
    slots s <= it of its own segment; a padding query sees the real keys before it, as transformers)."""
    return make_attention_mask(attention_mask, q_len, q_offset).dense(batch, q_len, kv_len)


def _ids_mask(attention_mask, t: int, offset):
    """The columns of `attention_mask` that belong to this call's ids: `[B, T]` bool (None without a mask).

    Without a cache the mask is `[B, T]` already; over a cache it is `[B, S]` and this call's ids sit at
    slots `[offset, offset + T)` (`offset` may be traced).
    """
    if attention_mask is None:
        return None
    mask = jnp.asarray(attention_mask).astype(bool)
    if mask.shape[1] == t and isinstance(offset, int) and offset == 0:
        return mask
    return jax.lax.dynamic_slice_in_dim(mask, offset, t, axis=1)


class PhiPreTrainedModel(nnx.Module, PretrainedMixin):
    """The base of every Phi class: `from_pretrained` / `save_pretrained` come from `phi_jax.loading`'s mixin,
    which imports no model class (the class is passed in)."""

    config: PhiConfig


class PhiModel(PhiPreTrainedModel):
    def __init__(self, config: PhiConfig, *, dtype=jnp.float32, param_dtype=None, attn_implementation: str = "xla",
                 rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_metadata=axes("vocab", "embed"), rngs=rngs)
        self.embed_dropout = nnx.Dropout(config.embd_pdrop, deterministic=True, rngs=rngs)
        self.layers = nnx.List([
            PhiDecoderLayer(config, attn_implementation=attn_implementation, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
            for _ in range(config.num_hidden_layers)])
        self.final_layernorm = make_layer_norm(config.hidden_size, config.layer_norm_eps, param_dtype, rngs)
        # Training sets a `jax.checkpoint_policies` name: each layer is then recomputed in the backward pass,
        # keeping only what the policy saves ("nothing_saveable": the layer's input).
        self.remat_policy: str | None = None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, cache=None, cache_index=None,
                 output_hidden_states: bool = False) -> PhiOutput:
        """
        Args:
          input_ids: `[B, T]` int.
          attention_mask: `[B, T]` (or `[B, S]` over the cache slots when `cache` is given); 1/True = real token,
            0/False = padding, values > 1 = packed-document ids (no attention across documents; pass
            position_ids restarting at each document). See `make_attention_mask`.
          position_ids: `[B, T]`; default `cache_index + 0..T-1`.
          cache: optional tuple of per-layer `(k, v)`, each `[B, S, K, H]`, written at slot `cache_index`.
        Returns:
          PhiOutput with `last_hidden_state: [B, T, D]`.
        """
        check_array("input_ids", input_ids)
        if jnp.ndim(input_ids) != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {jnp.shape(input_ids)}")
        b, t = jnp.shape(input_ids)
        if t == 0:
            raise ValueError(f"input_ids has shape {(b, t)}; the model needs at least one token per row")
        kv_len = t if cache is None else cache[0][0].shape[1]
        offset = 0 if cache is None else cache_index
        _check_mask("attention_mask", attention_mask, (b, kv_len))
        check_attention_mask(attention_mask)
        ids_mask = _ids_mask(attention_mask, t, offset)  # [B, T] bool or None
        check_input_ids(input_ids, self.config.vocab_size, mask=ids_mask)
        if position_ids is None:
            position_ids = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        _check_mask("position_ids", position_ids, (b, t))
        mask = make_attention_mask(attention_mask, t, None if cache is None else cache_index)

        if ids_mask is not None:
            # A masked position can never poison a real one: an id out of range there (the gather would give NaN)
            # is looked up as id 0; an id in range is looked up as transformers does, so the outputs at padding
            # positions are transformers'. Attention also keeps masked keys out of real queries.
            in_range = (input_ids >= 0) & (input_ids < self.config.vocab_size)
            input_ids = jnp.where(ids_mask | in_range, input_ids, 0)  # [B, T]
        x = _embed(self.embed_tokens, input_ids)  # [B, T, D]
        if self.config.pad_token_id is not None:
            # transformers' `nn.Embedding(..., padding_idx=pad_token_id)`: the pad id's row learns nothing from
            # the lookup (a tied lm_head still trains it); the forward is unchanged
            x = jnp.where((input_ids == self.config.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        x = self.embed_dropout(x)
        cos, sin = cos_sin(self.config, position_ids, x.dtype)  # [B, T, R] in the compute dtype
        x = constrain(x.astype(jnp.float32), ("batch", None, None))  # the residual stream is float32
        hidden_states = [x] if output_hidden_states else None
        new_cache = [] if cache is not None else None
        call = PhiDecoderLayer.__call__
        if self.remat_policy is not None:
            call = nnx.remat(call, policy=remat_policy(self.remat_policy), graph=False)
        for i, layer in enumerate(self.layers):
            x, layer_cache = call(layer, x, cos, sin, mask, None if cache is None else cache[i], cache_index)
            x = constrain(x, ("batch", None, None))
            if cache is not None:
                new_cache.append(layer_cache)
            if output_hidden_states and i < len(self.layers) - 1:
                hidden_states.append(x)
        x = layer_norm(self.final_layernorm, x)
        if output_hidden_states:
            hidden_states.append(x)
        return PhiOutput(last_hidden_state=x, hidden_states=None if hidden_states is None else tuple(hidden_states),
                         cache=None if new_cache is None else tuple(new_cache))


class TiedLMHead(nnx.Module):
    """lm_head when `tie_word_embeddings`: the embedding matrix (transposed) plus lm_head's own bias."""

    def __init__(self, vocab_size: int, *, param_dtype):
        self.bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype), **axes("vocab"))

    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        """`x: [..., D]`, `embedding: [V, D]` -> `[..., V]`."""
        logits = jnp.einsum("...D,VD->...V", x, embedding.astype(x.dtype), preferred_element_type=jnp.float32,
                            precision=matmul_precision(x.dtype), _dot_general=dot_general)
        return logits + self.bias[...].astype(jnp.float32)


class PhiForCausalLM(PhiPreTrainedModel, GenerationMixin):
    def __init__(self, config: PhiConfig, *, dtype=jnp.float32, param_dtype=None, attn_implementation: str = "xla",
                 rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.config = config
        self.model = PhiModel(config, dtype=dtype, param_dtype=param_dtype,
                              attn_implementation=attn_implementation, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = TiedLMHead(config.vocab_size, param_dtype=param_dtype)
        else:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=True, dtype=dtype,
                                      param_dtype=param_dtype, preferred_element_type=jnp.float32,
                                      dot_general=dot_general,
                                      precision=matmul_precision(dtype), kernel_metadata=axes("embed", "vocab"),
                                      bias_metadata=axes("vocab"), rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, V]` float32 (matmul in the compute dtype, float32 accumulation)."""
        hidden = hidden.astype(self.model.dtype)
        if isinstance(self.lm_head, TiedLMHead):
            embedding = self.model.embed_tokens.embedding[...]
            logits = over_rows(lambda rows: self.lm_head(rows, embedding), hidden)
        else:
            logits = over_rows(self.lm_head, hidden)
        return constrain(logits, ("batch", None, "act_vocab"))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, labels=None, cache=None,
                 cache_index=None, output_hidden_states: bool = False) -> PhiOutput:
        """See PhiModel; `labels: [B, T]` (-100 ignored) adds the shifted causal-LM loss."""
        out = self.model(input_ids, attention_mask, position_ids, cache=cache, cache_index=cache_index,
                         output_hidden_states=output_hidden_states)
        if labels is not None:
            _check_class_labels(labels, jnp.shape(input_ids), self.config.vocab_size)
        logits = self.logits(out.last_hidden_state)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return out.replace(logits=logits, loss=loss)


class PhiForSequenceClassification(PhiPreTrainedModel):
    """Scores the last non-pad token of each row (the rightmost token != pad_token_id), as transformers does."""

    def __init__(self, config: PhiConfig, *, dtype=jnp.float32, param_dtype=None, attn_implementation: str = "xla",
                 rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.config = config
        self.model = PhiModel(config, dtype=dtype, param_dtype=param_dtype,
                              attn_implementation=attn_implementation, rngs=rngs)
        self.score = nnx.Linear(config.hidden_size, config.num_labels, use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, precision=matmul_precision(dtype),
                                kernel_metadata=axes("embed", "classes"), rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, labels=None,
                 output_hidden_states: bool = False) -> PhiOutput:
        """`logits: [B, C]`; `labels: [B]` (or `[B, C]` floats for regression / multi-label)."""
        out = self.model(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states)
        logits = over_rows(self.score, out.last_hidden_state)  # [B, T, C]
        b, t = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if b != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (pad_token_id is None)")
            last = jnp.full((b,), t - 1)
        else:
            last = jnp.argmax(jnp.arange(t) * (input_ids != pad), axis=-1)  # [B]
        pooled = logits[jnp.arange(b), last]  # [B, C]
        if labels is not None:
            self._check_labels(labels, b)
        loss = None if labels is None else sequence_classification_loss(pooled, labels, self.config.problem_type)
        return out.replace(logits=pooled, loss=loss)

    def _check_labels(self, labels, batch: int) -> None:
        """As transformers' ForSequenceClassificationLoss reads them: class ids (`[B]`, in [0, C) or -100) for
        single-label classification, `[B, C]` values for regression and multi-label (`[B]` when C is 1)."""
        check_array("labels", labels)
        c, problem = self.config.num_labels, self.config.problem_type
        if problem is None:
            integer = jnp.issubdtype(labels.dtype, jnp.integer)
            problem = ("regression" if c == 1 else "single_label_classification" if integer
                       else "multi_label_classification")
        if problem == "single_label_classification":
            if jnp.size(labels) != batch:
                raise ValueError(f"labels has shape {tuple(labels.shape)}; single-label classification takes one "
                                 f"class id per row: ({batch},)")
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(f"labels must be integer class ids for {problem}, got dtype {labels.dtype}")
            check_labels(labels, c)
        elif jnp.size(labels) != batch * c:
            want = (batch,) if c == 1 else (batch, c)
            raise ValueError(f"labels has shape {tuple(labels.shape)}; {problem} takes {want}")


class PhiForTokenClassification(PhiPreTrainedModel):
    def __init__(self, config: PhiConfig, *, dtype=jnp.float32, param_dtype=None, attn_implementation: str = "xla",
                 rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.config = config
        self.model = PhiModel(config, dtype=dtype, param_dtype=param_dtype,
                              attn_implementation=attn_implementation, rngs=rngs)
        rate = 0.1 if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nnx.Dropout(rate, deterministic=True, rngs=rngs)
        self.score = nnx.Linear(config.hidden_size, config.num_labels, use_bias=True, dtype=dtype,
                                param_dtype=param_dtype, precision=matmul_precision(dtype),
                                kernel_metadata=axes("embed", "classes"), bias_metadata=axes("classes"), rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, labels=None,
                 output_hidden_states: bool = False) -> PhiOutput:
        """`logits: [B, T, C]`; `labels: [B, T]` (-100 ignored)."""
        out = self.model(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states)
        if labels is not None:
            _check_class_labels(labels, jnp.shape(input_ids), self.config.num_labels)
        logits = over_rows(self.score, self.dropout(out.last_hidden_state))
        loss = None if labels is None else cross_entropy(logits, labels)
        return out.replace(logits=logits, loss=loss)


MODEL_CLASSES = {cls.__name__: cls for cls in
                 (PhiModel, PhiForCausalLM, PhiForSequenceClassification, PhiForTokenClassification)}
