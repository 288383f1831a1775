"""PhiDecoderLayer: attention and MLP in parallel off one LayerNorm.

    h = x + dropout(attn(ln(x))) + dropout(mlp(ln(x)))

The residual stream `x` stays float32 whatever the compute dtype; the matmuls run in the
compute dtype (bf16 on accelerators) with float32 accumulation.
"""

from __future__ import annotations

import jax
from flax import nnx

from phi_jax.modeling.attention import PhiAttention
from phi_jax.config import PhiConfig
from phi_jax.modeling.layernorm import layer_norm, make_layer_norm
from phi_jax.modeling.mlp import PhiMLP


class PhiDecoderLayer(nnx.Module):
    def __init__(self, config: PhiConfig, *, attn_implementation: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.self_attn = PhiAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            qk_layernorm=config.qk_layernorm, layer_norm_eps=config.layer_norm_eps,
            attention_dropout=config.attention_dropout, attn_implementation=attn_implementation,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = PhiMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = make_layer_norm(config.hidden_size, config.layer_norm_eps, param_dtype, rngs)
        self.resid_dropout = nnx.Dropout(config.resid_pdrop, deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask, cache=None, cache_index=None):
        """`x: [B, T, D]` (the float32 residual stream) -> `([B, T, D], new_cache)`; see PhiAttention."""
        h = layer_norm(self.input_layernorm, x).astype(self.dtype)  # [B, T, D] in the compute dtype
        attn, new_cache = self.self_attn(h, cos, sin, mask, cache, cache_index)
        attn = self.resid_dropout(attn).astype(x.dtype)
        mlp = self.resid_dropout(self.mlp(h)).astype(x.dtype)
        return attn + mlp + x, new_cache
