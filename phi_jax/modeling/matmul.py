"""`dot_general`: the model's matrix products, whose gradient products stay in the compute dtype.

The model multiplies bf16 (or fp16) operands into a float32 result (`preferred_element_type=float32`: float32
accumulation, rounded once, as torch's bf16 Linear). JAX's transpose rule then multiplies the float32 cotangent
with the other 16-bit operand: XLA upcasts that operand and runs a float32 x float32 product, on an H100/H200
at most half the bf16 rate and on twice the bytes, for the two thirds of a train step's FLOPs that the backward
holds. Here the backward rounds the cotangent to the operands' dtype first and multiplies 16-bit x 16-bit with
float32 accumulation, as torch's autocast does. The forward is `lax.dot_general` exactly; float32 operands (and
any call without a wider result type) are `lax.dot_general` in both directions, so float32 parity is untouched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rounded_grad_dot(lhs, rhs, dims, precision, out_dtype, out_sharding):
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=out_dtype,
                           out_sharding=out_sharding)


def _fwd(lhs, rhs, dims, precision, out_dtype, out_sharding):
    return _rounded_grad_dot(lhs, rhs, dims, precision, out_dtype, out_sharding), (lhs, rhs)


def _bwd(dims, precision, out_dtype, out_sharding, res, g):
    lhs, rhs = res
    # The product in the operands' dtype: its transposes are 16-bit x 16-bit (float32 accumulation in the GEMM).
    _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims, precision=precision, preferred_element_type=lhs.dtype,
                                                  out_sharding=out_sharding), lhs, rhs)
    return vjp(g.astype(lhs.dtype))


_rounded_grad_dot.defvjp(_fwd, _bwd)
