"""LoRA adapters on the attention (q/k/v/dense) and MLP (fc1/fc2) projections, merged into the weights on export.

`add_lora` swaps each projection for a `ScaledLoRALinear` (Flax's `nnx.LoRALinear` with LoRA's scale) holding
the same kernel and bias Variables plus `lora.lora_a: [in, r]` (he-uniform) and `lora.lora_b: [r, out]`
(zeros), so training starts from the base model exactly; the adapters are `nnx.LoRAParam`s, the only
parameters a LoRA run trains. The update is `(alpha / r) * x @ A @ B` (LoRA's scale; alpha defaults to r,
i.e. scale 1). `merge_lora` folds `(alpha / r) * A @ B` into each kernel and restores the model's plain
`Linear` layers with the checkpoint's names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.modeling.attention import PhiAttention
from phi_jax.modeling.layernorm import axes
from phi_jax.modeling.mlp import PhiMLP
from phi_jax.modeling.projection import Linear, linear_apply, over_rows

TARGETS = {PhiAttention: ("q_proj", "k_proj", "v_proj", "dense"), PhiMLP: ("fc1", "fc2")}


class ScaledLoRALinear(nnx.LoRALinear):
    """`nnx.LoRALinear` whose adapter output is multiplied by `lora_scale` (alpha / rank, a static float)."""

    lora_scale: float = 1.0

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is None:  # over rows, as the model's `Linear`
            return over_rows(self._rows, x)
        return self._rows(x, out_sharding)

    def _rows(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = linear_apply(self, x, out_sharding)
        update = self.lora(x)
        return y + (update if self.lora_scale == 1.0 else self.lora_scale * update)


def _linear_kwargs(lin: nnx.Linear) -> dict:
    return dict(use_bias=lin.use_bias, dtype=lin.dtype, param_dtype=lin.param_dtype, precision=lin.precision,
                preferred_element_type=lin.preferred_element_type, dot_general=lin.dot_general)


def _targets(model):
    for _, module in nnx.iter_graph(model):
        for cls, names in TARGETS.items():
            if isinstance(module, cls):
                for name in names:
                    yield module, name


def add_lora(model: nnx.Module, rank: int, *, alpha: float | None = None, seed: int = 0) -> nnx.Module:
    """Adds rank-`rank` adapters scaled by `alpha / rank` (alpha None: rank, scale 1) in place; returns the model."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and alpha < float("inf")):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    rngs = nnx.Rngs(seed)
    for module, name in list(_targets(model)):
        base = getattr(module, name)
        if isinstance(base, nnx.LoRALinear):
            raise ValueError("the model already has LoRA adapters")
        in_name, out_name = base.kernel.get_metadata().get("out_sharding") or (None, None)
        lora = nnx.eval_shape(lambda: ScaledLoRALinear(
            base.in_features, base.out_features, lora_rank=rank, lora_param_dtype=base.param_dtype,
            a_metadata=axes(in_name, None), b_metadata=axes(None, out_name), rngs=nnx.Rngs(0),
            **_linear_kwargs(base)))
        lora.kernel, lora.bias = base.kernel, base.bias
        lora.lora_scale = float(alpha) / rank
        a = nnx.initializers.he_uniform()(rngs.params(), (base.in_features, rank), base.param_dtype)
        lora.lora.lora_a = nnx.LoRAParam(a, **axes(in_name, None))
        lora.lora.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), base.param_dtype),
                                         **axes(None, out_name))
        setattr(module, name, lora)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (`W + A @ B`) and restores the model's `Linear` layers, in place."""
    for module, name in list(_targets(model)):
        lora = getattr(module, name)
        if not isinstance(lora, nnx.LoRALinear):
            continue
        a, b = lora.lora.lora_a[...], lora.lora.lora_b[...]
        update = jnp.matmul(a, b, precision="highest") * getattr(lora, "lora_scale", 1.0)
        merged = lora.kernel[...] + update.astype(lora.kernel[...].dtype)
        plain = nnx.eval_shape(lambda: Linear(lora.in_features, lora.out_features, rngs=nnx.Rngs(0),
                                              **_linear_kwargs(lora)))
        plain.kernel = nnx.Param(merged, **{k: v for k, v in lora.kernel.get_metadata().items()
                                            if k == "out_sharding"}, eager_sharding=False)
        plain.bias = lora.bias
        setattr(module, name, plain)
    return model
