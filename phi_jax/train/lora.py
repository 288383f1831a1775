"""LoRA adapters on the attention (q/k/v/dense) and MLP (fc1/fc2) projections, merged into the weights on export.

`add_lora` swaps each projection for Flax's `nnx.LoRALinear` holding the same kernel and bias Variables plus
`lora.lora_a: [in, r]` (he-uniform) and `lora.lora_b: [r, out]` (zeros), so training starts from the base
model exactly; the adapters are `nnx.LoRAParam`s, the only parameters a LoRA run trains. The update is
`x @ A @ B` (scale 1, i.e. LoRA's alpha = r). `merge_lora` folds `A @ B` into each kernel and restores plain
`nnx.Linear` layers with the checkpoint's names.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from phi_jax.modeling.attention import PhiAttention
from phi_jax.modeling.layernorm import axes
from phi_jax.modeling.mlp import PhiMLP

TARGETS = {PhiAttention: ("q_proj", "k_proj", "v_proj", "dense"), PhiMLP: ("fc1", "fc2")}


def _linear_kwargs(lin: nnx.Linear) -> dict:
    return dict(use_bias=lin.use_bias, dtype=lin.dtype, param_dtype=lin.param_dtype, precision=lin.precision,
                preferred_element_type=lin.preferred_element_type)


def _targets(model):
    for _, module in nnx.iter_graph(model):
        for cls, names in TARGETS.items():
            if isinstance(module, cls):
                for name in names:
                    yield module, name


def add_lora(model: nnx.Module, rank: int, *, seed: int = 0) -> nnx.Module:
    """Adds rank-`rank` adapters in place; returns the model."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rngs = nnx.Rngs(seed)
    for module, name in list(_targets(model)):
        base = getattr(module, name)
        if isinstance(base, nnx.LoRALinear):
            raise ValueError("the model already has LoRA adapters")
        in_name, out_name = base.kernel.get_metadata().get("out_sharding") or (None, None)
        lora = nnx.eval_shape(lambda: nnx.LoRALinear(
            base.in_features, base.out_features, lora_rank=rank, lora_param_dtype=base.param_dtype,
            a_metadata=axes(in_name, None), b_metadata=axes(None, out_name), rngs=nnx.Rngs(0),
            **_linear_kwargs(base)))
        lora.kernel, lora.bias = base.kernel, base.bias
        a = nnx.initializers.he_uniform()(rngs.params(), (base.in_features, rank), base.param_dtype)
        lora.lora.lora_a = nnx.LoRAParam(a, **axes(in_name, None))
        lora.lora.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), base.param_dtype),
                                         **axes(None, out_name))
        setattr(module, name, lora)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (`W + A @ B`) and restores plain `nnx.Linear`s, in place."""
    for module, name in list(_targets(model)):
        lora = getattr(module, name)
        if not isinstance(lora, nnx.LoRALinear):
            continue
        a, b = lora.lora.lora_a[...], lora.lora.lora_b[...]
        merged = lora.kernel[...] + jnp.matmul(a, b, precision="highest").astype(lora.kernel[...].dtype)
        plain = nnx.eval_shape(lambda: nnx.Linear(lora.in_features, lora.out_features, rngs=nnx.Rngs(0),
                                                  **_linear_kwargs(lora)))
        plain.kernel = nnx.Param(merged, **{k: v for k, v in lora.kernel.get_metadata().items()
                                            if k == "out_sharding"}, eager_sharding=False)
        plain.bias = lora.bias
        setattr(module, name, plain)
    return model
