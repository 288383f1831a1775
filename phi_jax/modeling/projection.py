"""`project(linear, x)`: a Linear layer applied so that a single row is still a matrix product on a GPU.

XLA:GPU's dot-strength-reduction rewrites a product whose left side is one row (`[1, D] @ [D, F]`, every
projection of a batch-1 decode step) as a broadcast multiply written to memory plus a reduction whenever
D * F is below about 10M elements: phi-2's square [2560, 2560] attention projections ran 2x slower
than as a GEMM (benchmarks/gpu_decode.py). Two rows are a GEMM that reads the weights once, like one row;
so on CUDA and ROCm a single row is padded with a row of zeros inside the product and the zero row dropped.
On the CPU (and TPU) the plain one-row product stays: there a [2, D] GEMM ran 1.4x slower than the [1, D]
matrix-vector product (float32, [2048, 8192], jax 0.10.2). The form is chosen per platform when the program
is lowered (`jax.lax.platform_dependent`); it changes the layout of one product, never what is computed.

`Linear` (the attention's and MLP's projections) and the model's heads apply their products to the input's rows
(`over_rows`: `[..., D]` viewed as `[N, D]`), for their weight gradients' sake.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.modeling.matmul import add_bias


def linear_apply(linear: nnx.Linear, x: jax.Array, out_sharding=None) -> jax.Array:
    """What `nnx.Linear.__call__` computes, with the bias added by `add_bias` (its gradient sums in float32)."""
    bias = linear.bias[...] if linear.bias is not None else None
    x, kernel, bias = linear.promote_dtype((x, linear.kernel[...], bias), dtype=linear.dtype)
    kw = {"out_sharding": out_sharding}
    if linear.preferred_element_type is not None:
        kw["preferred_element_type"] = linear.preferred_element_type
    y = linear.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision, **kw)
    return y if bias is None else add_bias(y, bias)


def over_rows(fn, x: jax.Array) -> jax.Array:
    """`fn(x)` for a row-wise `fn` (`[N, D] -> [N, F]`), with `x: [..., D]` viewed as one matrix of rows.

    The view (and the result's back to `[..., F]`) is a bitcast. It matters for the gradient: the weight gradient of
    `[B, T, D] @ [D, F]` contracts two axes, B and T, and XLA's CPU backend then writes a transposed copy of the
    cotangent (recomputing the fusion that makes it) before each weight-gradient product; with one row axis the
    product reads both operands in place. benchmarks/train.py's CPU train step (jax 0.10.2, 2 cores): 120.4 ms with
    the 3-d products against 101.2 ms over rows (benchmarks/cpu_step_parts.py, RESULTS.md). The forward program is
    the same either way, apart from bitcasts.
    """
    lead = x.shape[:-1]
    if len(lead) <= 1:
        return fn(x)
    y = fn(x.reshape(math.prod(lead), x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


class Linear(nnx.Linear):
    """The attention's and MLP's projections: `nnx.Linear` (same parameters, same forward) through `linear_apply`,
    so that a 16-bit model's bias gradients are float32 sums over the batch (see `matmul.add_bias`), over the
    input's rows (`over_rows`)."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None:  # a sharding of the [..., F] result
            return linear_apply(self, inputs, out_sharding)
        return over_rows(lambda rows: linear_apply(self, rows), inputs)


def project(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """`linear(x)` for `x: [..., D]` -> `[..., F]`; one row (all leading sizes 1) goes through as 2 rows on GPUs."""
    lead = x.shape[:-1]
    if math.prod(lead) != 1:
        return linear(x)
    row = x.reshape(1, x.shape[-1])

    def two_rows(row):
        return linear(jnp.pad(row, ((0, 1), (0, 0))))[:1]  # [2, D]: the row, then zeros; keep the row

    out = jax.lax.platform_dependent(row, cuda=two_rows, rocm=two_rows, default=linear)
    return out.reshape(*lead, -1)  # [..., F]
