"""PhiMLP: fc1 -> activation (gelu_new for every released Phi) -> fc2."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.modeling.partitioning import axes
from phi_jax.modeling.layernorm import matmul_precision
from phi_jax.modeling.matmul import dot_general, projection_result_type
from phi_jax.modeling.projection import Linear, project


def _gelu_tanh(x):  # transformers' gelu_new / gelu_pytorch_tanh
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_fast(x):
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class PhiMLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        self.activation_fn = ACTIVATIONS[hidden_act]
        # float32 accumulation, rounded once to the compute dtype in each product (`projection_result_type`); the
        # activation runs in float32 on fc1's result.
        linear = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, precision=matmul_precision(dtype),
                      preferred_element_type=projection_result_type(dtype), dot_general=dot_general, rngs=rngs)
        self.dtype = dtype
        self.fc1 = Linear(hidden_size, intermediate_size, **linear,
                          kernel_metadata=axes("embed", "mlp"), bias_metadata=axes("mlp"))
        self.fc2 = Linear(intermediate_size, hidden_size, **linear,
                          kernel_metadata=axes("mlp", "embed"), bias_metadata=axes("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, F] -> [B, T, D]`."""
        h = self.activation_fn(project(self.fc1, x).astype(jnp.float32)).astype(self.dtype)  # [B, T, F]
        return project(self.fc2, h).astype(self.dtype)
