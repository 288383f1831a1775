"""One sampling draw: phi_jax's jitted `Sampling.next_tokens` against transformers' warpers + `torch.multinomial`.

The same float32 logits (vocabulary 51,200, standard deviation 3) for both, per setting and batch size; medians
of `--repeats` draws, both libraries with the same thread count. Prints each time and the ratio (torch / phi_jax:
above 1 means phi_jax is faster). This is the per-token cost `generate(do_sample=True)` adds to a decode step.

    python benchmarks/sampling.py [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from bench_env import header, median_time, pin_threads

SETTINGS = [dict(temperature=0.7, top_k=40), dict(temperature=0.7, top_k=40, top_p=0.95),
            dict(temperature=0.7, top_p=0.95), dict(temperature=0.7)]
VOCAB = 51200


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="CPU cores for both libraries")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    threads = pin_threads(args.threads)  # before jax and torch start their thread pools
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import torch
    from transformers.generation import logits_process as lp

    from phi_jax.generation.sampling import make_sampler
    torch.set_num_threads(threads)
    print("\n".join(header(threads)))
    print(f"vocabulary {VOCAB}, float32 logits; medians of {args.repeats} draws after a warm-up")
    for batch in (1, 8):
        logits = (np.random.default_rng(0).standard_normal((batch, VOCAB)) * 3).astype(np.float32)
        for kw in SETTINGS:
            sampler = make_sampler(True, **kw)
            draw = jax.jit(lambda x, key, s=sampler: s.next_tokens(x, key))
            x = jnp.asarray(logits)
            keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))
            draw(x, next(keys)).block_until_ready()  # compile
            t_jax = median_time(lambda: draw(x, next(keys)).block_until_ready(), args.repeats)

            warpers = [lp.TemperatureLogitsWarper(kw["temperature"])]
            if "top_k" in kw:
                warpers.append(lp.TopKLogitsWarper(kw["top_k"]))
            if "top_p" in kw:
                warpers.append(lp.TopPLogitsWarper(kw["top_p"]))
            warp = lp.LogitsProcessorList(warpers)
            scores = torch.from_numpy(logits)

            def torch_draw():
                with torch.no_grad():
                    return torch.multinomial(torch.softmax(warp(None, scores), dim=-1), 1)
            torch_draw()
            t_torch = median_time(torch_draw, args.repeats)
            print(f"batch {batch}, {kw}: phi_jax {t_jax * 1e3:.3f} ms, transformers {t_torch * 1e3:.3f} ms: "
                  f"{t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
