"""The `xla` attention on the CPU against torch's `scaled_dot_product_attention`, one process, same threads.

Causal, float32, no padding: phi_jax's `attend_xla` (the default `attn_implementation`, the path every CPU forward
and train step takes; its causal query blocks included) and `F.scaled_dot_product_attention(is_causal=True)`
(torch's fused CPU flash kernel), forward and, at the train step's shape, forward + backward. Also times the same
attention with its two products in the layout the GPU and TPU programs use (positions before heads, the CPU's
own form before 2026-11-27; see `_grouped_products` in phi_jax/modeling/attention.py). Prints ms per call (the
median of interleaved rounds, each the mean of a few calls of one implementation after another, so that load drift
on a shared host hits all three alike), torch / phi_jax (above 1: phi_jax is faster) and the CPU layout's gain.

    python benchmarks/cpu_attention.py [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_env import header, interleaved, patched, pin_threads  # noqa: E402

SHAPES = (  # (name, batch, seq, heads, head_dim, with backward)
    ("phi-2 heads, 1 x 512", 1, 512, 32, 80, False),
    ("phi-2 heads, 1 x 2048", 1, 2048, 32, 80, False),
    ("phi-1.5 heads, 8 x 128 (a batch-8 prefill)", 8, 128, 32, 64, False),
    ("benchmarks/train.py's model, 4 x 128", 4, 128, 8, 32, True),
)


def interleaved_ms(fns, calls: int, rounds: int) -> list[float]:
    """Median ms per call of each of `fns`, timed round by round (`calls` calls of each in turn per round)."""
    med = interleaved(dict(enumerate(fns)), rounds, calls=calls)
    return [1e3 * med[i] for i in range(len(fns))]


def positions_major():
    """Programs traced inside take the GPU/TPU layout of the attention's products on the CPU too."""
    from phi_jax.modeling import attention
    return patched(attention, "_CPU_PRODUCTS", attention._PRODUCTS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
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
        grad = jax.jit(jax.grad(lambda q, k, v, mask: jnp.sum(attend_xla(q, k, v, mask, causal=True) * g),
                                argnums=(0, 1, 2)))
        with positions_major():  # compiled here, so these two keep the GPU/TPU layout
            fwd_pm = jax.jit(lambda q, k, v, mask: attend_xla(q, k, v, mask, causal=True)).lower(
                q, k, v, mask).compile()
            grad_pm = jax.jit(jax.grad(lambda q, k, v, mask: jnp.sum(attend_xla(q, k, v, mask, causal=True) * g),
                                       argnums=(0, 1, 2))).lower(q, k, v, mask).compile()
        tg = torch.tensor(g.transpose(0, 2, 1, 3).copy())

        def torch_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

        def torch_fb():
            (F.scaled_dot_product_attention(tq, tk, tv, is_causal=True) * tg).sum().backward()
        cases = [("forward", lambda: fwd(q, k, v, mask).block_until_ready(),
                  lambda: fwd_pm(q, k, v, mask).block_until_ready(), torch_fwd)]
        if backward:
            cases.append(("fwd+bwd", lambda: jax.block_until_ready(grad(q, k, v, mask)),
                          lambda: jax.block_until_ready(grad_pm(q, k, v, mask)), torch_fb))
        for what, *fns in cases:
            ours, pm, ref = interleaved_ms(fns, calls, args.rounds)
            print(f"{name:<44} {what:>8}: phi_jax xla {ours:8.2f} ms (GPU/TPU layout {pm:8.2f} ms, "
                  f"{pm / ours:.2f}x), torch SDPA {ref:8.2f} ms, torch / phi_jax = {ref / ours:.2f}x "
                  f"(max |d| {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
