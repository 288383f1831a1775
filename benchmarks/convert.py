"""Conversion throughput and peak memory: a phi-1.5-geometry random checkpoint, HF -> Orbax -> HF.

Each direction runs in a fresh subprocess; peak memory is that process' VmHWM growth over its resident set
just before the conversion (imports and a tiny warm-up conversion excluded). Throughput is model bytes / wall.

    python benchmarks/convert.py [--dtype float32|bfloat16] [--workdir DIR] [--chunk-size 64MB]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

_CHILD = """
import json, sys, time
from phi_jax import convert
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
src, dst, to, chunk, warm_src, warm_dst = sys.argv[1:]
convert.convert(warm_src, warm_dst, to=to, chunk_size=chunk)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
s = convert.convert(src, dst, to=to, chunk_size=chunk)
print(json.dumps({"grow": status("VmHWM") - base, "seconds": s["seconds"], "bytes": s["bytes_written"]}))
"""


def main() -> int:
    import jax
    import orbax.checkpoint

    from phi_jax import convert
    from phi_jax.config import phi_1_5
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--chunk-size", default="256MB")
    args = p.parse_args()
    print(f"python {platform.python_version()}, jax {jax.__version__}, orbax {orbax.checkpoint.__version__}, "
          f"device {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
    root = tempfile.mkdtemp(dir=args.workdir, prefix="phi-convert-bench-")
    try:
        config = phi_1_5()
        src = convert.write_random_hf(os.path.join(root, "hf"), config, dtype=args.dtype)
        tiny = config.replace(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4)
        warm = convert.write_random_hf(os.path.join(root, "warm"), tiny, dtype=args.dtype)
        convert.convert(warm, os.path.join(root, "warm-orbax"), to="orbax")
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        largest = config.vocab_size * config.hidden_size * (4 if args.dtype == "float32" else 2)
        print(f"model: phi-1.5 geometry, {args.dtype}, {size / 1e9:.2f} GB; largest tensor {largest / 1e9:.3f} GB; "
              f"Orbax chunk {args.chunk_size}")
        runs = [("hf -> orbax", src, "orbax-out", "orbax", warm),
                ("orbax -> hf", os.path.join(root, "orbax-out"), "hf-out", "hf", os.path.join(root, "warm-orbax"))]
        for name, s, d, to, w in runs:
            os.sync()
            r = subprocess.run([sys.executable, "-c", _CHILD, s, os.path.join(root, d), to, args.chunk_size, w,
                                os.path.join(root, f"warm-{d}")], capture_output=True, text=True, check=False)
            if r.returncode:
                print(r.stderr[-3000:])
                return 1
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name}: {m['bytes'] / 1e9:.2f} GB in {m['seconds']:.1f} s = {m['bytes'] / m['seconds'] / 1e6:.0f} MB/s; "
                  f"peak RSS growth {m['grow'] / 1e6:.0f} MB = {m['grow'] / size:.3f} x model size "
                  f"({m['grow'] / largest:.2f} x largest tensor)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
