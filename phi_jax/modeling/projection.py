"""`project(linear, x)`: a Linear layer applied so that a single row is still a matrix product.

XLA:GPU's dot-strength-reduction rewrites a product whose left side is one row (`[1, D] @ [D, F]`, every
projection of a batch-1 decode step) as a broadcast multiply written to memory plus a reduction whenever
D * F is below about 10M elements: phi-2's square [2560, 2560] attention projections ran 2x slower
than as a GEMM (benchmarks/gpu_decode.py). Two rows are a GEMM that reads the weights once, like one row;
so a single row is padded with a row of zeros inside the product and the zero row dropped. It changes
the layout of one product, not what is decoded, on every backend alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def project(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """`linear(x)` for `x: [..., D]` -> `[..., F]`; one row (all leading sizes 1) goes through as 2 rows."""
    lead = x.shape[:-1]
    if math.prod(lead) != 1:
        return linear(x)
    rows = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))  # [2, D]: the row, then zeros
    return linear(rows)[:1].reshape(*lead, -1)  # [..., F]
