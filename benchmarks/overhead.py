"""Host overhead per call of `phi_jax.compiled(model)` and of `generate`, over the bare jitted programs.

A 32-layer model with tiny matrices (hidden 64), so that the compiled program itself takes little time
and what is left is the Python around it. Each figure is the median of `--repeats` calls, measurements
interleaved (A, B, A, B, ...) so that load on the machine hits both sides alike.

  forward : `compiled(model)(ids)` against `jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))`
            over state split once (a user's own jit), and against the same jit over a flat list of arrays
            (the least a call can do); and one `nnx.split(model)` alone, which every call paid before.
  generate: `generate(model, ids, max_new_tokens=1)` (checks, bucket padding, cached split, readback of the
            tokens) against the jitted prefill+decode program called directly on prepared inputs.

Goals (issue 11): forward overhead <= 1 ms, generate overhead <= 3 ms.

    python benchmarks/overhead.py [--layers 32] [--repeats 200]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi_jax
from bench_env import interleaved
from phi_jax.compilation import split_cached
from phi_jax.generation.generate import _generate_program, _prepare, generate
from phi_jax.generation.sampling import Greedy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per-call statistic; min on a loaded machine, where medians measure the other processes")
    args = p.parse_args(argv)
    stat = {"median": np.median, "min": np.min}[args.stat]
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores, "
          f"{platform.processor() or platform.machine()}")
    print(f"versions: python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}")
    config = phi_jax.phi_2(num_hidden_layers=args.layers, hidden_size=64, intermediate_size=128,
                           num_attention_heads=2, vocab_size=256, bos_token_id=None, eos_token_id=None)
    model = phi_jax.PhiForCausalLM(config, rngs=nnx.Rngs(0))
    n_vars = len(jax.tree.leaves(nnx.state(model)))
    print(f"model: phi-2 layout, {args.layers} layers, hidden 64, {n_vars} arrays; {args.stat} of {args.repeats} "
          f"interleaved calls; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 16)), jnp.int32)
    fwd = phi_jax.compiled(model)
    graphdef, state = nnx.split(model)
    own = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    static, leaves = split_cached(model)
    flat = jax.jit(lambda leaves, ids: static.merge(leaves)(ids).logits)
    t = interleaved({
        "compiled": lambda: fwd(ids).logits.block_until_ready(),
        "own jit over split state": lambda: own(state, ids).block_until_ready(),
        "jit over flat arrays": lambda: flat(leaves, ids).block_until_ready(),
    }, args.repeats, stat=stat)
    # timed apart: its 20+ ms of allocations between the calls above would slow whichever call follows it
    t.update(interleaved({"nnx.split alone": lambda: nnx.split(model)}, max(5, args.repeats // 10), stat=stat))
    base = t["jit over flat arrays"]
    print("\nforward, batch 1 x 16 tokens (ms per call):")
    for name, v in t.items():
        print(f"  {name:26s} {v * 1e3:7.3f}")
    print(f"  overhead of compiled(): {(t['compiled'] - base) * 1e3:+.3f} ms over the jit on flat arrays "
          f"(ratio {t['compiled'] / base:.2f}), {(t['compiled'] - t['own jit over split state']) * 1e3:+.3f} ms "
          f"over a user's jit on split state (ratio {t['compiled'] / t['own jit over split state']:.2f}); "
          f"goal <= 1 ms")

    prompt = np.asarray(ids)
    kw = dict(max_new_tokens=1, eos_token_id=[], pad_token_id=0)
    prep = _prepare(model, prompt, None, 1, [], 0, None)
    dev = [jnp.asarray(x) for x in (prep.ids, prep.mask, prep.eos)]

    def bare():
        tokens, _ = _generate_program(static, leaves, dev[0], dev[1], np.int32(1), Greedy(), np.uint32(0), dev[2],
                                      np.int32(0), cache_length=prep.cache_length, out_length=prep.out_length)
        return np.asarray(tokens)

    np.testing.assert_array_equal(generate(model, prompt, **kw)[:, 16:], bare()[:, :1])
    g = interleaved({"generate": lambda: generate(model, prompt, **kw), "bare program": bare}, args.repeats, stat=stat)
    print("\ngenerate(max_new_tokens=1), batch 1 x 16 tokens (ms per call):")
    for name, v in g.items():
        print(f"  {name:26s} {v * 1e3:7.3f}")
    print(f"  overhead of generate(): {(g['generate'] - g['bare program']) * 1e3:+.3f} ms "
          f"(ratio {g['generate'] / g['bare program']:.2f}); goal <= 3 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
