"""`dot_general`: the model's matrix products, whose gradient products stay in the compute dtype.

Where the model multiplies bf16 (or fp16) operands into a float32 result (`preferred_element_type=float32`: the
attention scores and the LM head's logits; the Linear projections take `projection_result_type` below), JAX's
transpose rule multiplies the float32 cotangent with the other 16-bit operand: XLA upcasts that operand and runs a
float32 x float32 product, on an H100/H200 at most half the bf16 rate and on twice the bytes, for the two thirds of
a train step's FLOPs that the backward holds. Here the backward rounds the cotangent to the operands' dtype first
and multiplies 16-bit x 16-bit with float32 accumulation, as torch's autocast does. The forward is `lax.dot_general`
exactly; float32 operands (and any call without a wider result type) are `lax.dot_general` in both directions, so
float32 parity is untouched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """`lax.dot_general`, with 16-bit gradient products when 16-bit operands give a wider result (see above)."""
    kw = dict(precision=precision, preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    if (preferred_element_type is None or lhs.dtype != rhs.dtype or lhs.dtype.itemsize != 2
            or jnp.dtype(preferred_element_type).itemsize <= 2):
        return lax.dot_general(lhs, rhs, dimension_numbers, **kw)
    return _rounded_grad_dot(lhs, rhs, _freeze(dimension_numbers), precision, jnp.dtype(preferred_element_type),
                             out_sharding)


def _freeze(dims):
    (lc, rc), (lb, rb) = dims
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _rounded_grad_dot(lhs, rhs, dims, precision, out_dtype, out_sharding):
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=out_dtype,
                           out_sharding=out_sharding)


def _jvp(dims, precision, out_dtype, out_sharding, primals, tangents):
    """A custom JVP, not a custom VJP: the primal product stays a plain `dot_general` in the linearized program,
    so remat policies that save matmul outputs (`dots_with_no_batch_dims_saveable`) still see it. The tangent
    products run in the operands' dtype and are widened after; reverse mode transposes them into the cotangent
    rounded to that dtype times the other operand. Symbolic-zero tangents (frozen weights) cost no product."""
    lhs, rhs = primals
    t_lhs, t_rhs = tangents
    y = lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=out_dtype,
                        out_sharding=out_sharding)

    def low(a, b):
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=lhs.dtype,
                               out_sharding=out_sharding).astype(out_dtype)
    terms = []
    if not isinstance(t_lhs, SymbolicZero):
        terms.append(low(t_lhs, rhs))
    if not isinstance(t_rhs, SymbolicZero):
        terms.append(low(lhs, t_rhs))
    ty = functools.reduce(jnp.add, terms) if terms else jnp.zeros(y.shape, y.dtype)
    return y, ty


_rounded_grad_dot.defjvp(_jvp, symbolic_zeros=True)


def projection_result_type(dtype):
    """The result type of the model's Linear projections for compute `dtype` (their `preferred_element_type`).

    float32 compute: float32. 16-bit compute: None, i.e. the operands' own 16-bit type: the product accumulates in
    float32 (cuBLAS's and the TPU's matrix units' rule for 16-bit operands) and is rounded once, in the GEMM, to the
    compute dtype, as torch's bf16 Linear writes it. A float32 result rounded by the next op (the form before
    2026-11-27) wrote and read twice the bytes per projection (the fourth H200 run's forward: 193 cuBLAS calls, all
    with float32 outputs) and kept the projections' outputs in float32 wherever a remat policy saves them. The bias
    is then added in the compute dtype; the activation after fc1 still runs in float32. Such 16-bit products use
    `lax.dot_general` in both directions (16-bit gradient products, as `dot_general` above gives wider ones).
    """
    return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else None


@jax.custom_jvp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` over the last axis, whose bias gradient sums in float32 when `y` is 16-bit.

    The gradient of a broadcast bias is a sum over every token of the batch. In a bf16 add that sum runs in bf16:
    XLA's CPU backend gave 8192 for 16384 cotangents of 1 (jax 0.10.2), and a bf16 model's k_proj bias gradient
    moved 2x further from another attention implementation's than with float32 projection results. Here the
    forward is the plain add (one rounding, a GEMM epilogue XLA may fuse); the tangent adds the bias in float32, so
    reverse mode sums the cotangents in float32 and rounds once to the bias's dtype, as torch's bf16 Linear does
    (float32 accumulation in cuBLAS's bias-gradient epilogue)."""
    return y + bias


@add_bias.defjvp
def _add_bias_jvp(primals, tangents):
    y, bias = primals
    t_y, t_bias = tangents
    wide = jnp.promote_types(t_bias.dtype, jnp.float32)
    return y + bias, (t_y.astype(wide) + t_bias.astype(wide)).astype(t_y.dtype)
