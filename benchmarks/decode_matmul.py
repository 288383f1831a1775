"""Small-batch decode matmuls: time `x[M, D] @ W[D, F]` for M = 1..8 against the bandwidth floor.

A decode step is a chain of such products; this isolates how the backend handles M = 1 (a GEMV)
versus small M, with bf16 or float32 output, over `--layers` unrolled pairs (D->F, F->D) as in decoding.

    python benchmarks/decode_matmul.py [--dtype bfloat16] [--d 2560] [--f 10240]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def bench(fn, *args, repeats=50):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--d", type=int, default=2560)
    p.add_argument("--f", type=int, default=10240)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.dtype}")
    ws = [jax.random.normal(jax.random.key(i), (args.d, args.f), dtype) * 0.02 for i in range(args.layers)]
    x2 = [jax.random.normal(jax.random.key(-i), (args.f, args.d), dtype) * 0.02 for i in range(args.layers)]
    big = jnp.ones((1 << 28,), jnp.float32)
    bw = big.nbytes / bench(jax.jit(jnp.sum), big, repeats=10)
    weight_bytes = sum(w.nbytes for w in ws + x2)
    print(f"bandwidth (jax sum) {bw / 1e9:.0f} GB/s; {args.layers} x (D->F, F->D) weights {weight_bytes / 1e9:.2f} GB"
          f" -> floor {1e3 * weight_bytes / bw:.2f} ms")
    for out in (None, jnp.float32):
        for m in (1, 2, 4, 8):
            x = jax.random.normal(jax.random.key(2), (m, args.d), dtype)

            @jax.jit
            def chain(h, ws, x2):  # unrolled over layers, each its own weights, as in the model
                for w1, w2 in zip(ws, x2):
                    y = jnp.dot(h, w1, preferred_element_type=out).astype(dtype)
                    h = jnp.dot(y, w2, preferred_element_type=out).astype(dtype) * 0.5
                return h

            t = bench(chain, x, ws, x2)
            print(f"M={m} out={'f32' if out else args.dtype:8s}: {1e3 * t:.2f} ms "
                  f"({weight_bytes / t / 1e9:.0f} GB/s)")


if __name__ == "__main__":
    main()
