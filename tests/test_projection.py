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


def test_weight_gradients_read_the_activations_in_place():
    """The projections and the LM head run over rows (`over_rows`): each weight gradient contracts one token axis,
    the major axis of both operands as they are in memory (`dot(x, g)`, contracting dims {0} and {0}). On `[B, T, D]`
    operands it contracted two, and XLA's CPU backend fed each weight-gradient product a transposed copy of the
    cotangent (contracting dims {0} and {1}), made by a fusion that re-read it column by column: the CPU train step
    was about 1.2x slower (benchmarks/cpu_step_parts.py)."""
    import phi_jax
    cfg = phi_jax.phi_2(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = phi_jax.PhiForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.ones((2, 24), jnp.int32)  # 48 tokens: no size of the model
    grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids, labels=ids).loss))
    hlo = grad.lower(params).compile().as_text()
    kernels = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 2 and x.shape[0] != 128}  # not embed
    dots = []
    for m in re.finditer(r"= f32\[(\d+),(\d+)\]\S* dot\(.*?lhs_contracting_dims=\{([\d,]*)\}, "
                         r"rhs_contracting_dims=\{([\d,]*)\}", hlo):
        shape = (int(m.group(1)), int(m.group(2)))
        if shape in kernels or shape[::-1] in kernels:
            dots.append((shape, m.group(3), m.group(4)))
    assert len(dots) == 6 * 2 + 1, dots  # six projections per layer and the LM head
    assert all(lhs == rhs == "0" for _, lhs, rhs in dots), dots


def test_rows_give_the_layer_values_for_any_leading_shape():
    from phi_jax.modeling.projection import Linear
    plain = nnx.Linear(64, 96, rngs=nnx.Rngs(0))
    lin = Linear(64, 96, rngs=nnx.Rngs(0))
    for shape in [(64,), (5, 64), (3, 2, 64), (2, 3, 4, 64), (0, 3, 64)]:
        x = jax.random.normal(jax.random.key(len(shape)), shape)
        y = lin(x)
        assert y.shape == shape[:-1] + (96,)
        np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x)), rtol=1e-6, atol=1e-6)
