"""Where a decode step's device time goes: per-kernel totals from a JAX profiler trace.

Runs `--steps` streaming decode steps (one compiled step each) of a random phi-2-geometry model for
each batch size, records a perfetto trace, and prints the kernels that took the most device time.

    python benchmarks/profile_decode.py [--layers 32] [--batch 1 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi_jax
from phi_jax.generation.generate import generate_stream


def kernel_totals(trace_dir: str) -> dict[str, float]:
    """Sums the durations (µs) of complete events on device threads of the perfetto trace in `trace_dir`."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    pids = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in pids.items() if "gpu" in name.lower() or "/device" in name.lower()}
    if not device:
        print("no device process in the trace; processes:", sorted(pids.values()))
    totals = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in device:
            totals[e["name"]] += e.get("dur", 0)
    return totals


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    cfg = phi_jax.phi_2(num_hidden_layers=args.layers)
    model = phi_jax.PhiForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; phi-2 geometry, {args.layers} layers, bf16")
    for b in args.batch:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, 100))
        kw = dict(max_new_tokens=args.steps, eos_token_id=[], cache_length=256)
        for _ in generate_stream(model, ids, **kw):  # compile and warm up
            pass
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in generate_stream(model, ids, **kw):
                    pass
            totals = kernel_totals(d)
        total = sum(totals.values())
        print(f"\nbatch {b}: device time {total / 1e3 / args.steps:.2f} ms per step over {len(totals)} kernel names")
        for name, us in totals.most_common(args.top):
            print(f"  {us / args.steps:8.1f} µs/step  {name[:110]}")


if __name__ == "__main__":
    main()
