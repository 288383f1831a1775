"""`modeling.projection.project`: one row is a two-row product on GPUs only, chosen when the program is lowered."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax.modeling.projection import project


def _dot_lhs_rows(platform: str) -> set[int]:
    lin = nnx.Linear(64, 96, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(lin)
    fn = jax.jit(lambda state, x: project(nnx.merge(graphdef, state), x))
    text = jax.export.export(fn, platforms=[platform])(state, jax.ShapeDtypeStruct((1, 1, 64), jnp.float32)) \
        .mlir_module()
    # the left operand of every dot_general: tensor<ROWSx64xf32>
    return {int(m) for m in re.findall(r"stablehlo\.dot_general[^\n]*\(tensor<(\d+)x64xf32>", text)}


def test_one_row_is_two_rows_on_cuda_only():
    assert _dot_lhs_rows("cuda") == {2}  # XLA:GPU would turn a one-row product into multiply + reduce
    assert _dot_lhs_rows("cpu") == {1}  # the CPU's matrix-vector product is faster than a two-row GEMM
    assert _dot_lhs_rows("tpu") == {1}


def test_same_values_as_the_linear_layer():
    lin = nnx.Linear(64, 96, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 1, 64))
    np.testing.assert_allclose(np.asarray(project(lin, x)), np.asarray(lin(x)), rtol=1e-6, atol=1e-6)
    xs = jax.random.normal(jax.random.key(2), (3, 2, 64))  # more than one row: the layer as it is
    np.testing.assert_array_equal(np.asarray(project(lin, xs)), np.asarray(lin(xs)))
