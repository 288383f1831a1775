"""Cost of making masked positions inert (issue 9): `attend_xla` against the previous formula, in one run.

The previous `_attend_block` (softmax over scores floored at float32 min; masked values multiplied by 0) is
restated here as the reference; the current one also zeroes the probabilities of masked keys, gives zeros to a
query that sees no key and replaces never-seen values by 0. Both run jitted on the same inputs (phi-2 attention
geometry: 32 heads, head_dim 80, left padding); medians of --repeats runs, the two in alternation.

    python benchmarks/masking_cost.py [--batch 4] [--seq 512] [--repeats 15] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.modeling.attention import attend_xla
from phi_jax.modeling.layernorm import matmul_precision
from phi_jax.modeling.model import build_mask


def previous_attend(q, k, v, mask):
    """phi_jax's `_attend_block` before issue 9 (full square, no dropout)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    precision = matmul_precision(q.dtype)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                        precision=precision) * (h ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, precision=precision)
    return out.reshape(b, t, n, h)


def median_ms(fns, *args, repeats: int) -> list[float]:
    """Median wall time of each function, the functions run in alternation (so load drift hits both alike)."""
    for fn in fns:
        fn(*args).block_until_ready()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(*args).block_until_ready()
            times[i].append(time.perf_counter() - start)
    return [1e3 * float(np.median(x)) for x in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    b, t, n, h = args.batch, args.seq, 32, 80
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, t, n, h), dtype)
    v = jax.random.normal(keys[2], (b, t, n, h), dtype)
    pad = np.ones((b, t), bool)
    pad[::2, : t // 4] = False  # every other row left-padded by a quarter
    mask = build_mask(jnp.asarray(pad), b, t, t, 0)
    old = jax.jit(previous_attend)
    new = jax.jit(attend_xla)  # the full square, as previous_attend
    real = pad
    diff = np.abs(np.asarray(new(q, k, v, mask), np.float32) - np.asarray(old(q, k, v, mask), np.float32))[real]
    t_old, t_new = median_ms([old, new], q, k, v, mask, repeats=args.repeats)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, device {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {platform.processor() or platform.machine()}")
    print(f"attention B={b} T={t} N={n} H={h} {args.dtype}: previous {t_old:.2f} ms, masked-safe {t_new:.2f} ms, "
          f"ratio {t_new / t_old:.3f}; max |diff| at real queries {diff.max():.2e}")


if __name__ == "__main__":
    main()
