"""Wall time of `phi-jax generate` in a fresh process: first run (empty compilation cache), second run (the
cache filled by the first), and with the cache off, on a random checkpoint written for the purpose.

Each figure is the median of `--repeats` (>= 5) runs; every first run starts from a new empty cache directory.
Also printed: the compilation time and the programs compiled / loaded from the cache, from the command's own
stats line, after the date, machine, versions and thread count.

    python benchmarks/cli_generate.py                                     # small geometry, 2 layers, CPU
    python benchmarks/cli_generate.py --geometry phi-2 --layers 32 --dtype bfloat16 --gpu
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench_env import header, pin_threads

MIN_REPEATS = 5
GEOMETRIES = {"small": dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
              "phi-1.5": {}, "phi-2": dict(hidden_size=2560, intermediate_size=10240, partial_rotary_factor=0.4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=51200)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=MIN_REPEATS, help=f"runs per figure, median (>= {MIN_REPEATS})")
    p.add_argument("--threads", type=int, default=None, help="CPU cores (default: all)")
    p.add_argument("--gpu", action="store_true", help="let JAX use the GPU (default: CPU only)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.repeats < MIN_REPEATS:
        p.error(f"--repeats must be >= {MIN_REPEATS}")
    threads = pin_threads(args.threads)
    env = dict(os.environ)
    env.pop("PHI_JAX_COMPILE_CACHE", None)
    if not args.gpu:
        env["JAX_PLATFORMS"] = os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax.config import phi_1_5
    from phi_jax.modeling.model import PhiForCausalLM
    from phi_jax.parity import write_tokenizer
    for line in header(threads):
        print(line)
    root = tempfile.mkdtemp(dir=args.workdir, prefix="phi-cli-bench-")
    try:
        config = phi_1_5(num_hidden_layers=args.layers, vocab_size=args.vocab_size, bos_token_id=0, eos_token_id=None,
                         **GEOMETRIES[args.geometry])
        model_dir = os.path.join(root, "model")
        PhiForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=getattr(jnp, args.dtype)).save_pretrained(model_dir)
        write_tokenizer(model_dir, args.vocab_size)
        print(f"model: {args.geometry} geometry, {args.layers} layers, vocab {args.vocab_size}, {args.dtype}; "
              f"command: phi-jax generate --max-new-tokens {args.max_new_tokens} (no eos: every token decoded); "
              f"{args.repeats} runs per figure")

        def run(*cache_args) -> tuple[float, str]:
            cmd = [sys.executable, "-m", "phi_jax.cli", "generate", "--model", model_dir, "--dtype", args.dtype,
                   "--max-new-tokens", str(args.max_new_tokens), *cache_args, "def fibonacci(n):"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            return wall, r.stderr.strip().splitlines()[-1]

        figures = {"cache off": [], "first run (empty cache)": [], "second run (cache filled)": []}
        stats = {}
        for i in range(args.repeats):
            cache = os.path.join(root, f"cache-{i}")
            for name, extra in (("cache off", ["--no-compile-cache"]), ("first run (empty cache)", ["--compile-cache", cache]),
                                ("second run (cache filled)", ["--compile-cache", cache])):
                wall, line = run(*extra)
                figures[name].append(wall)
                stats[name] = re.search(r"compilation: (.*?\))", line).group(1)
            shutil.rmtree(cache)
        for name, walls in figures.items():
            print(f"{name:26s}: {np.median(walls):6.2f} s wall (median; runs {', '.join(f'{w:.2f}' for w in walls)}); "
                  f"compilation {stats[name]}")
        first, second = np.median(figures["first run (empty cache)"]), np.median(figures["second run (cache filled)"])
        print(f"second run / first run: {second / first:.2f} ({first - second:.2f} s saved per invocation)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
