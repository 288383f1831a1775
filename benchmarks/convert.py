"""Conversion throughput and peak memory: a phi-1.5-geometry random checkpoint, HF -> Orbax -> HF.

Each run is a fresh subprocess; peak memory is that process' VmHWM growth over its resident set just before
the conversion (imports and a tiny warm-up conversion excluded). Throughput is model bytes / wall. Each
direction runs `--repeats` times (>= 5); the script prints the median time and throughput and the largest
peak-memory growth, after the date, machine, versions and the CPU cores the conversion may use (`--threads`).

    python benchmarks/convert.py [--dtype float32|bfloat16] [--layers 24] [--workdir DIR] [--chunk-size 64MB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from bench_env import header, pin_threads

MIN_REPEATS = 5

_CHILD = """
import json, sys, time
from phi_jax import convert
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
src, dst, to, chunk, warm_src, warm_dst = sys.argv[1:]
convert.convert(warm_src, warm_dst, to=to, chunk_size=chunk, progress=False)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
s = convert.convert(src, dst, to=to, chunk_size=chunk, progress=False)
print(json.dumps({"grow": status("VmHWM") - base, "seconds": s["seconds"], "bytes": s["bytes_written"]}))
"""


def _random_hf(directory: str, config, dtype: str) -> str:
    """A random-weight phi_jax model saved as a Hugging Face directory (weights are random normal: conversion
    speed does not depend on their values)."""
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax.modeling.model import PhiForCausalLM
    model = PhiForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=getattr(jnp, dtype))
    model.save_pretrained(directory)
    return directory


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--layers", type=int, default=24, help="decoder layers (phi-1.5 has 24)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--chunk-size", default="256MB")
    p.add_argument("--repeats", type=int, default=MIN_REPEATS, help=f"runs per direction, median (>= {MIN_REPEATS})")
    p.add_argument("--threads", type=int, default=None, help="CPU cores the conversion may use (default: all)")
    args = p.parse_args()
    if args.repeats < MIN_REPEATS:
        p.error(f"--repeats must be >= {MIN_REPEATS}")
    threads = pin_threads(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import orbax.checkpoint  # noqa: F401  (its version is printed)

    from phi_jax.config import phi_1_5
    for line in header(threads):
        print(line)
    root = tempfile.mkdtemp(dir=args.workdir, prefix="phi-convert-bench-")
    try:
        config = phi_1_5(num_hidden_layers=args.layers)
        src = _random_hf(os.path.join(root, "hf"), config, args.dtype)
        tiny = config.replace(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4)
        warm = _random_hf(os.path.join(root, "warm"), tiny, args.dtype)
        from phi_jax import convert
        convert.convert(warm, os.path.join(root, "warm-orbax"), to="orbax", progress=False)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        largest = config.vocab_size * config.hidden_size * (4 if args.dtype == "float32" else 2)
        print(f"model: phi-1.5 geometry, {args.layers} layers, {args.dtype}, {size / 1e9:.2f} GB; largest tensor "
              f"{largest / 1e9:.3f} GB; Orbax chunk {args.chunk_size}; {args.repeats} runs per direction")
        runs = [("hf -> orbax", src, "orbax-out", "orbax", warm),
                ("orbax -> hf", os.path.join(root, "orbax-out"), "hf-out", "hf", os.path.join(root, "warm-orbax"))]
        for name, s, d, to, w in runs:
            seconds, grows, nbytes = [], [], 0
            for i in range(args.repeats):
                out = os.path.join(root, d)
                shutil.rmtree(out, ignore_errors=True)  # the last run's output stays (the next direction reads it)
                os.sync()
                r = subprocess.run([sys.executable, "-c", _CHILD, s, out, to, args.chunk_size, w,
                                    os.path.join(root, f"warm-{d}-{i}")], capture_output=True, text=True, check=False)
                if r.returncode:
                    print(r.stderr[-3000:])
                    return 1
                m = json.loads(r.stdout.strip().splitlines()[-1])
                seconds.append(m["seconds"])
                grows.append(m["grow"])
                nbytes = m["bytes"]
            t = float(np.median(seconds))
            print(f"{name}: {nbytes / 1e9:.2f} GB in {t:.1f} s (median; runs {', '.join(f'{x:.1f}' for x in seconds)}) "
                  f"= {nbytes / t / 1e6:.0f} MB/s; peak RSS growth {max(grows) / 1e6:.0f} MB (largest of the runs) = "
                  f"{max(grows) / size:.3f} x model size ({max(grows) / largest:.2f} x largest tensor)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
