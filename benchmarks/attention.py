"""Attention kernels and phi-2 forward with each `attn_implementation`, in one run.

Part 1, kernels: causal, bf16, batch 4, 32 heads, head_dim 64 / 80 / 128, seq 1024..8192; forward and
forward+backward TFLOP/s (forward FLOPs = 4 * B * N * T * S * H / 2 for the causal half; fwd+bwd counted as
3.5x that) for: phi_jax pallas (our kernel for this platform through `attn_implementation="pallas"`),
phi_jax xla, jax cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`), torch SDPA (when torch sees a
GPU) and tokamax (when importable).
Part 2, model: phi-2 geometry (32 layers, random weights, bf16) forward at batch 4 x 2048 with each
implementation against transformers (SDPA) on the same device.

Every case runs in try/except and prints its error. Prints date, device and versions first.

    python benchmarks/attention.py            # GPU: the full tables (< 4 minutes on an H100/H200)
    python benchmarks/attention.py --quick    # tiny sizes, e.g. on the CPU (pallas runs interpreted there)
    python benchmarks/attention.py --skip-model --head-dims 80 --seqs 4096
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback

if "--quick" in sys.argv and "--gpu" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from phi_jax.modeling.attention import attend_masked_xla, attend_pallas  # noqa: E402
from phi_jax.modeling.mask import AttentionMask  # noqa: E402

XLA_MAX_SEQ = 4096  # the xla path materialises [B, N, T/8.., S] float32 scores; longer runs out of time and memory


def _timeit(fn, *args, budget: float = 0.2) -> float:
    """Seconds per call: compile and warm once, then enough back-to-back calls to fill `budget`."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    n = int(min(50, max(3, budget / max(one, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def _stub_xprof() -> None:
    """tokamax imports `xprof` (a profiler UI) for its own benchmarking helpers only; where it is not installed,
    empty modules stand in for it so that tokamax's kernels can be imported."""
    import importlib.util
    import types

    if "xprof" in sys.modules or importlib.util.find_spec("xprof") is not None:
        return
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so that submodules resolve
        mod.get_kernel_stats_tool = None
        sys.modules.setdefault(name, mod)


def _jax_impls():
    impls = {
        "pallas": lambda q, k, v: attend_pallas(q, k, v, AttentionMask()),
        "xla": lambda q, k, v: attend_masked_xla(q, k, v, AttentionMask()),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
    }
    try:
        _stub_xprof()
        import tokamax  # noqa: F401
        impls["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True,
                                                                         implementation="mosaic")
    except Exception as e:  # optional
        print(f"tokamax: not used ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return impls


def _torch_sdpa():
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    return torch


def kernel_table(batch, heads, head_dims, seqs, budget):
    impls = _jax_impls()
    torch = _torch_sdpa()
    names = list(impls) + (["torch sdpa"] if torch is not None else [])
    print(f"\n== kernels: causal bf16, batch {batch}, {heads} heads; TFLOP/s forward / fwd+bwd (3.5x) ==")
    print(f"{'H':>4} {'seq':>6} " + " ".join(f"{n:>17}" for n in names))
    for h in head_dims:
        for t in seqs:
            keys = jax.random.split(jax.random.key(t + h), 4)
            q, k, v, do = (jax.random.normal(kk, (batch, t, heads, h), jnp.bfloat16) for kk in keys)
            flops = 4 * batch * heads * t * t * h / 2
            cells = []
            for name, f in impls.items():
                if name == "xla" and t > XLA_MAX_SEQ:
                    cells.append(f"{'(skipped)':>17}")
                    continue
                cell = []
                try:
                    fwd = jax.jit(f)
                    cell.append(flops / _timeit(fwd, q, k, v, budget=budget) / 1e12)
                    bwd = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
                    cell.append(3.5 * flops / _timeit(bwd, q, k, v, do, budget=budget) / 1e12)
                except Exception as e:
                    print(f"  H={h} seq={t} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                cells.append(f"{' / '.join(f'{x:.3g}' for x in cell) or 'error':>17}")
            if torch is not None:
                cells.append(f"{_torch_cell(torch, batch, heads, h, t, flops, budget):>17}")
            print(f"{h:>4} {t:>6} " + " ".join(cells), flush=True)


def _torch_cell(torch, batch, heads, h, t, flops, budget):
    try:
        import torch.nn.functional as F
        q, k, v = (torch.randn(batch, heads, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)

        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (q, k, v), do)

        out = []
        for fn, mult in ((fwd, 1.0), (fwd_bwd, 3.5)):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            n = int(min(50, max(3, budget / max(time.perf_counter() - t0, 1e-6))))
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            out.append(mult * flops / ((time.perf_counter() - t0) / n) / 1e12)
        return f"{out[0]:.0f} / {out[1]:.0f}"
    except Exception as e:
        return f"error {type(e).__name__}"


def _transformers_forward(cfg, layers, hidden, heads, ids) -> float | None:
    """Seconds per forward of transformers' PhiForCausalLM (SDPA, bf16, random weights) on the GPU, or None."""
    torch = _torch_sdpa()
    if torch is None:
        print("transformers: skipped (torch sees no GPU)")
        return None
    try:
        import transformers
        tcfg = transformers.PhiConfig(vocab_size=cfg.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, partial_rotary_factor=0.4)
        tcfg._attn_implementation = "sdpa"
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                tmodel = transformers.PhiForCausalLM(tcfg).eval()
        finally:
            torch.set_default_dtype(default)
        tids = torch.from_numpy(np.asarray(ids)).cuda()
        with torch.no_grad():
            tmodel(tids)
            torch.cuda.synchronize()
            n = 5
            t0 = time.perf_counter()
            for _ in range(n):
                tmodel(tids)
            torch.cuda.synchronize()
        t_torch = (time.perf_counter() - t0) / n
        print(f"transformers sdpa: {1e3 * t_torch:8.1f} ms", flush=True)
        del tmodel
        torch.cuda.empty_cache()  # its memory back before phi_jax's programs run
        return t_torch
    except Exception as e:
        print(f"transformers: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        return None


def model_table(layers, batch, seq, hidden, heads, budget):
    """phi-2 geometry forward with each implementation and transformers, same geometry and random weights.
    transformers runs first, so that a run cut short still has the reference and the ratios printed so far."""
    import phi_jax
    from phi_jax.config import phi_2

    print(f"\n== model: phi-2 geometry ({layers} layers, hidden {hidden}, {heads} heads), bf16, "
          f"batch {batch} x {seq} tokens, forward ms ==", flush=True)
    cfg = phi_2(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden,
                num_attention_heads=heads)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    t_torch = _transformers_forward(cfg, layers, hidden, heads, ids)
    base = phi_jax.PhiForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _, state = nnx.split(base)
    for impl in ("cudnn", "pallas", "xla"):
        try:
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: phi_jax.PhiForCausalLM(
                cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_implementation=impl, rngs=nnx.Rngs(0))))
            fwd = jax.jit(lambda state, ids, graphdef=graphdef: nnx.merge(graphdef, state)(ids).logits)
            t = _timeit(fwd, state, ids, budget=budget)
            ratio = f"; speed-up over transformers: {t_torch / t:.2f}x" if t_torch else ""
            print(f"phi_jax {impl:<7}: {1e3 * t:8.1f} ms{ratio}", flush=True)
        except Exception as e:
            print(f"phi_jax {impl}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 80, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.2, help="seconds of timed calls per measurement")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    _stub_xprof()
    versions = [f"jax {jax.__version__}"]
    for mod in ("torch", "transformers", "tokamax"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            pass
    dev = jax.devices()[0]
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  device: {dev.platform} {dev.device_kind} "
          f"({platform.machine()}, {os.cpu_count()} cores); " + ", ".join(versions))
    if args.quick:
        args.head_dims, args.seqs, args.batch, args.heads, args.budget = [64, 80], [128, 256], 1, 2, 0.05
    t0 = time.perf_counter()
    if not args.skip_kernels:
        try:
            kernel_table(args.batch, args.heads, args.head_dims, args.seqs, args.budget)
        except Exception:
            traceback.print_exc()
    if not args.skip_model:
        try:
            if args.quick:
                model_table(layers=2, batch=1, seq=128, hidden=160, heads=2, budget=args.budget)
            else:
                model_table(layers=32, batch=4, seq=2048, hidden=2560, heads=32, budget=args.budget)
        except Exception:
            traceback.print_exc()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
