"""The `xla` attention on the CPU against torch's `scaled_dot_product_attention`, one process, same threads.

Causal, float32, no padding: phi_jax's `attend_xla` (the default `attn_implementation`, the path every CPU forward
and train step takes; its causal query blocks included) and `F.scaled_dot_product_attention(is_causal=True)`
(torch's fused CPU flash kernel), forward and, at the train step's shape, forward + backward. Prints ms per call
(the best of 3 rounds) and torch / phi_jax (above 1: phi_jax is faster).

    python benchmarks/cpu_attention.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_env import header, pin_threads  # noqa: E402

SHAPES = (  # (name, batch, seq, heads, head_dim, with backward)
    ("phi-2 heads, 1 x 512", 1, 512, 32, 80, False),
    ("phi-2 heads, 1 x 2048", 1, 2048, 32, 80, False),
    ("phi-1.5 heads, 8 x 128 (a batch-8 prefill)", 8, 128, 32, 64, False),
    ("benchmarks/train.py's model, 4 x 128", 4, 128, 8, 32, True),
)


def best_ms(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return 1e3 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    args = p.parse_args()
    threads = pin_threads(args.threads)
    import torch
    import torch.nn.functional as F

    from phi_jax.modeling.attention import attend_xla
    torch.set_num_threads(threads)
    print("\n".join(header(threads)))
    for name, b, t, n, h, backward in SHAPES:
        rng = np.random.default_rng(t + n)
        q, k, v, g = (rng.standard_normal((b, t, n, h), np.float32) for _ in range(4))
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None].repeat(b, 0)
        # the mask is an argument (as in the model, where it comes from the inputs), not a constant to fold
        fwd = jax.jit(lambda q, k, v, mask: attend_xla(q, k, v, mask, causal=True))
        tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3).copy(), requires_grad=backward) for x in (q, k, v))
        err = np.abs(np.asarray(fwd(q, k, v, mask)) - F.scaled_dot_product_attention(
            tq, tk, tv, is_causal=True).detach().numpy().transpose(0, 2, 1, 3)).max()
        calls = max(1, int(2e8 // (b * n * t * t * h)))

        def torch_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        rows = [("forward", best_ms(lambda: fwd(q, k, v, mask).block_until_ready(), calls),
                 best_ms(torch_fwd, calls))]
        if backward:
            grad = jax.jit(jax.grad(lambda q, k, v, mask: jnp.sum(attend_xla(q, k, v, mask, causal=True) * g),
                                    argnums=(0, 1, 2)))
            tg = torch.tensor(g.transpose(0, 2, 1, 3).copy())

            def torch_fb():
                (F.scaled_dot_product_attention(tq, tk, tv, is_causal=True) * tg).sum().backward()
            rows.append(("fwd+bwd", best_ms(lambda: jax.block_until_ready(grad(q, k, v, mask)), calls),
                         best_ms(torch_fb, calls)))
        for what, ours, ref in rows:
            print(f"{name:<44} {what:>8}: phi_jax xla {ours:8.2f} ms, torch SDPA {ref:8.2f} ms, "
                  f"torch / phi_jax = {ref / ours:.2f}x  (max |d| {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
