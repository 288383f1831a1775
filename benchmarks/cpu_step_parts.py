"""Where benchmarks/train.py's CPU step spends its time: the whole step with one part taken out, and the parts' rates.

1. The train step of benchmarks/train.py (hidden 256, 4 layers, 8 heads, 4 x 128 tokens, float32, AdamW),
   compiled once as it is and once per ablation, timed in interleaved rounds: `no-attention` (the attention returns
   its queries), `no-gelu` (the MLP's activation is the identity), `no-softmax` (the attention's softmax is a clip
   and a scale), and `3-d products` (the projections and LM head as `[B, T, D] @ [D, F]`, the form before `projection.over_rows`).
   The time an ablation saves is what that part costs inside the step (XLA fuses across parts, so roughly).
2. The same parts alone against torch, interleaved: the attention's batched products at the step's shapes, and
   elementwise transcendentals (tanh, exp) against a multiply, per element, in XLA loop fusions.

    python benchmarks/cpu_step_parts.py [--threads 2] [--rounds 21]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

from bench_env import header, interleaved, patched, pin_threads

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def ablations() -> dict:
    import jax.numpy as jnp
    from train import three_d_products

    from phi_jax.modeling import attention, mlp
    gelu = dict(mlp.ACTIVATIONS, gelu_new=lambda x: x)
    return {
        "as is": contextlib.nullcontext,
        "no-attention": lambda: patched(attention, "get_attention_fn",
                                        lambda impl: (lambda q, k, v, mask, dropout=None: q)),
        "no-gelu": lambda: patched(mlp, "ACTIVATIONS", gelu),
        "no-softmax": lambda: patched(attention, "_softmax", lambda x: jnp.clip(x, -1.0, 1.0) * 1e-3),
        "3-d products": three_d_products,
    }


def step_parts(rounds: int) -> None:
    import jax
    from train import CPU_GEOMETRY, jax_step
    from phi_jax.modeling.model import PhiForCausalLM
    from phi_jax.parity import random_checkpoint

    runs, losses = {}, {}
    with tempfile.TemporaryDirectory() as d:
        random_checkpoint(d, **CPU_GEOMETRY)
        for name, ctx in ablations().items():
            with ctx():  # traced and compiled under the patch
                state, frozen, step_fn, batch = jax_step(PhiForCausalLM.from_pretrained(d), 4, 128, None)
                state, metrics = step_fn(state, frozen, batch, None)
                losses[name] = float(metrics["loss"])
            box = [state]

            def run(box=box, step_fn=step_fn, frozen=frozen, batch=batch):
                box[0], m = step_fn(box[0], frozen, batch, None)
                jax.block_until_ready(m["loss"])
            runs[name] = run
    med = interleaved(runs, rounds)
    base = med["as is"]
    print(f"train step, {rounds} interleaved rounds (first-step loss in brackets):")
    for name, t in med.items():
        saved = "" if name == "as is" else f"  saves {1e3 * (base - t):6.1f} ms"
        print(f"  {name:14} {1e3 * t:7.1f} ms{saved}  [{losses[name]:.6f}]")


def rates(rounds: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((32, 128, 32), np.float32), rng.standard_normal((32, 32, 128), np.float32)
    flops = 2 * 32 * 128 * 128 * 32
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    mm = jax.jit(jnp.matmul)
    med = interleaved({"xla": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: torch.bmm(ta, tb)},
                      rounds, calls=20)
    print(f"attention's batched product [32, 128, 32] x [32, 32, 128]: XLA {flops / med['xla'] / 1e9:.0f} GFLOP/s, "
          f"torch {flops / med['torch'] / 1e9:.0f} GFLOP/s")

    k = 50  # a chain of k ops, each behind an optimization barrier (one loop fusion each)
    x = jnp.asarray(rng.standard_normal((512, 256), np.float32) * 0.1)
    xt = torch.from_numpy(np.asarray(x).copy())
    ops = {"multiply": (lambda v: v * 1.0001, lambda v: v * 1.0001), "tanh": (jnp.tanh, torch.tanh),
           "exp": (lambda v: jnp.exp(v) * 0.5, lambda v: torch.exp(v) * 0.5)}
    fns = {}
    for name, (jop, top) in ops.items():
        def chain(v, jop=jop):
            for _ in range(k):
                v = jop(jax.lax.optimization_barrier(v))
            return v
        jf = jax.jit(chain)

        def tchain(top=top):
            v = xt
            for _ in range(k):
                v = top(v)
            return v
        fns[f"xla {name}"] = lambda jf=jf: jf(x).block_until_ready()
        fns[f"torch {name}"] = tchain
    med = interleaved(fns, rounds)
    for name in ops:
        per = {lib: 1e9 * med[f"{lib} {name}"] / (k * x.size) for lib in ("xla", "torch")}
        print(f"elementwise {name:8} on [512, 256]: XLA {per['xla']:.3f} ns/element, torch {per['torch']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="CPU cores for both (default: the usable cores)")
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    threads = pin_threads(args.threads)
    import jax  # noqa: F401  (after pin_threads)
    import torch
    torch.set_num_threads(threads)
    print("\n".join(header(threads)))
    step_parts(args.rounds)
    rates(args.rounds)


if __name__ == "__main__":
    sys.exit(main())
