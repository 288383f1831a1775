"""`project(linear, x)`: a Linear layer applied so that a single row is still a matrix product on a GPU.

XLA:GPU's dot-strength-reduction rewrites a product whose left side is one row (`[1, D] @ [D, F]`, every
projection of a batch-1 decode step) as a broadcast multiply written to memory plus a reduction whenever
D * F is below about 10M elements: phi-2's square [2560, 2560] attention projections ran 2x slower
than as a GEMM (benchmarks/gpu_decode.py). Two rows are a GEMM that reads the weights once, like one row;
so on CUDA and ROCm a single row is padded with a row of zeros inside the product and the zero row dropped.
On the CPU (and TPU) the plain one-row product stays: there a [2, D] GEMM ran 1.4x slower than the [1, D]
matrix-vector product (float32, [2048, 8192], jax 0.10.2). The form is chosen per platform when the program
is lowered (`jax.lax.platform_dependent`); it changes the layout of one product, never what is computed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


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
