"""Compiled phi_jax forward against transformers' PyTorch forward, same weights and inputs, one process.

Default: phi-1.5 geometry with 4 layers (vocab 51200), batch 1, 512 tokens, float32, CPU, 2 threads each.
On a GPU machine, `--gpu` runs both on the GPU (`--dtype bfloat16 --geometry phi-2 --layers 32` for phi-2).
Prints both times, the ratio, phi_jax's achieved GFLOP/s and the rate XLA reaches on a plain
512x2048x8192 matmul measured in the same run (the machine's practical ceiling), after the date, machine,
versions, thread count (`--threads N`: both libraries on the same N cores) and the FLOP total of one forward.
Times are medians of `--repeats` (>= 5) runs after a warm-up; the weights are randomized (`phi_jax.parity.
randomize`), not transformers' default init.

    python benchmarks/forward.py [--layers 4] [--seq 512] [--batch 1] [--repeats 10] [--gpu --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from bench_env import header, median_time, pin_threads

MIN_REPEATS = 5


def forward_flops(cfg, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections, attention, MLP, lm_head."""
    d, f, v, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    tokens = batch * seq
    per_layer = 2 * tokens * (d * d + 2 * d * kv + d * d + 2 * d * f) + 2 * 2 * batch * seq * seq * d
    return n_layers * per_layer + 2 * tokens * d * v


def matmul_rate(repeats: int, dtype) -> float:
    import jax
    import jax.numpy as jnp

    from phi_jax.modeling.layernorm import matmul_precision
    a = jax.random.normal(jax.random.key(0), (512, 2048), dtype)
    b = jax.random.normal(jax.random.key(1), (2048, 8192), dtype)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=matmul_precision(dtype)))
    jax.block_until_ready(mm(a, b))
    t = median_time(lambda: jax.block_until_ready(mm(a, b)), repeats)
    return 2 * 512 * 2048 * 8192 / t / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help=f"timed runs of each library, median (>= {MIN_REPEATS})")
    p.add_argument("--threads", type=int, default=2, help="CPU cores for both libraries (XLA affinity, torch threads)")
    p.add_argument("--geometry", choices=("phi-1.5", "phi-2"), default="phi-1.5")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--gpu", action="store_true", help="run both on the GPU")
    args = p.parse_args()
    if args.repeats < MIN_REPEATS:
        p.error(f"--repeats must be >= {MIN_REPEATS} (figures are medians of at least {MIN_REPEATS} runs)")
    threads = pin_threads(args.threads)  # before jax and torch start their thread pools
    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import torch

    import phi_jax
    from phi_jax.parity import random_checkpoint, relative_error

    torch.set_num_threads(threads)
    dtype = jnp.dtype(args.dtype)
    torch_dtype = getattr(torch, args.dtype)
    dev = "cuda" if args.gpu else "cpu"
    geometry = dict(hidden_size=2560, intermediate_size=10240, partial_rotary_factor=0.4) \
        if args.geometry == "phi-2" else {}
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    with tempfile.TemporaryDirectory() as d:
        # random_checkpoint randomizes every weight (logits of a few units), not transformers' default init
        torch_model = random_checkpoint(d, num_hidden_layers=args.layers, **geometry)
        model = phi_jax.PhiForCausalLM.from_pretrained(d, dtype=dtype)
    for line in header(threads):
        print(line)
    torch_model = torch_model.to(device=dev, dtype=torch_dtype)
    cfg = model.config
    flops = forward_flops(cfg, args.batch, args.seq)
    print(f"model: {args.geometry} geometry, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}; "
          f"batch {args.batch} x {args.seq} tokens, {args.dtype}; median of {args.repeats} runs each")
    print(f"FLOPs per forward: {flops:.4e} ({flops / 1e9:.1f} GFLOP; matmuls only, 2 per multiply-add)")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    fwd = phi_jax.compiled(model)
    jids = jnp.asarray(ids)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(jids).logits)
    compile_s = time.perf_counter() - t0
    t_jax = median_time(lambda: jax.block_until_ready(fwd(jids).logits), args.repeats)

    tids = torch.from_numpy(ids).to(dev)

    def torch_forward():
        out = torch_model(tids).logits
        sync()
        return out

    with torch.no_grad():
        ref = torch_forward().float().cpu().numpy()
        t_torch = median_time(torch_forward, args.repeats)
    err, _ = relative_error(np.asarray(out, np.float32), ref)

    ceiling = matmul_rate(args.repeats, dtype)
    jax_rate, torch_rate = flops / t_jax / 1e9, flops / t_torch / 1e9
    print(f"phi_jax forward     : {1e3 * t_jax:8.1f} ms  {jax_rate:6.1f} GFLOP/s  (compile {compile_s:.1f} s)")
    print(f"transformers forward: {1e3 * t_torch:8.1f} ms  {torch_rate:6.1f} GFLOP/s")
    print(f"XLA plain matmul 512x2048x8192: {ceiling:6.1f} GFLOP/s")
    print(f"speed-up over transformers: {t_torch / t_jax:.2f}x (goal >= 2.2x)")
    print(f"phi_jax / matmul ceiling  : {100 * jax_rate / ceiling:.0f}% (goal >= 85%)")
    print(f"max relative logit error  : {err:.1e}")


if __name__ == "__main__":
    sys.exit(main())
