"""GPU check and benchmark of the Mosaic GPU flash-attention kernel (phi_jax/kernels/flash_attention_gpu.py).

1. Numerics (bf16, one case fp16): output and dq/dk/dv of `flash_attention_gpu` against `attention_reference`
   (float32 maths on the same bf16 inputs) for causal, left/right padding with fully padded rows, packed segments, a
   query offset, GQA, head_dim 64 and 80; one PASS/FAIL line per case (max |err| / max |ref| <= 2e-2).
2. Speed: forward and forward+backward TFLOP/s, causal, bf16, batch 4, 32 heads, head_dim 64/80/128,
   seq 1024..8192, against `jax.nn.dot_product_attention(implementation="cudnn")` and the XLA reference.
   Causal FLOPs count half of 4*B*N*T*S*H; forward+backward counts 3.5x the forward.
3. `--variants` (alone, < 3 min): the other kernel forms (`VARIANTS`: the forward's head dim in 16-wide tiles,
   `BlockSizes(head_split=False)`, the default before 2026-11-27; two consumer warpgroups per CTA,
   `BlockSizes(warpgroups=2)`; the backward's head dim in 16-wide tiles, `BlockSizes(bwd_head_split=False)`, its
   products waited on one by one, `BlockSizes(bwd_paired=False)`, and both, the backward before the fifth H200
   run) against the reference (PASS/FAIL per case, output and gradients), then forward and forward+backward
   TFLOP/s of each against the default and cuDNN at head_dim 64/80, seq 4096, with the ratios.
Each case runs in its own try/except, so one failure prints its error and the rest still run.

    python benchmarks/gpu_attention.py [--quick] [--seqs 1024,2048,4096,8192] [--dims 64,80,128]
    python benchmarks/gpu_attention.py --variants
    python benchmarks/gpu_attention.py --ablate --warpgroups 1,2 --head-split 0,1 --dims 64,80 --skip-check --skip-table
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.kernels.flash_attention_gpu import BlockSizes, flash_attention_gpu
from phi_jax.kernels.reference import attention_reference


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, the denominator floored at 1e-2 (a one-key row has gradients of ~0)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-2))


def check_case(name, *, batch, t, s, n, kv, h, causal=True, q_offset=0, kind="none", tol=2e-2,
               dt=jnp.bfloat16, bs=None) -> bool:
    keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 4)
    q = jax.random.normal(keys[0], (batch, t, n, h), dt)
    k = jax.random.normal(keys[1], (batch, s, kv, h), dt)
    v = jax.random.normal(keys[2], (batch, s, kv, h), dt)
    qseg = kvseg = None
    if kind == "left":  # row 0 left-padded by 40 keys (its first queries see nothing), row 1 right-padded by 25
        kvseg = jnp.ones((batch, s), jnp.int32).at[0, :40].set(0).at[1, s - 25:].set(0)
    elif kind == "packed":  # two documents per row, then padding
        kvseg = jnp.where(jnp.arange(s) < s // 3, 1, jnp.where(jnp.arange(s) < s - 10, 2, 0))
        kvseg = jnp.broadcast_to(kvseg, (batch, s)).astype(jnp.int32)
        qseg = kvseg[:, :t] if t == s else None
    kw = dict(q_segment_ids=qseg, kv_segment_ids=kvseg, causal=causal, q_offset=q_offset)
    cot = jax.random.normal(keys[3], (batch, t, n, h), jnp.float32)

    def out_and_grads(fn):  # one compile for the output and the three gradients
        def f(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
            return out, vjp(cot.astype(out.dtype))
        return jax.jit(f)

    out, grads = out_and_grads(functools.partial(flash_attention_gpu, block_sizes=bs))(q, k, v)
    ref, grads_ref = out_and_grads(attention_reference)(q, k, v)
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, grads_ref)]
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
    ok = finite and max(errs) <= tol
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel err out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
          f"dv {errs[3]:.2e}{'' if finite else ' NON-FINITE'}", flush=True)
    return ok


def check_cases(cases, label: str) -> int:
    """Runs `check_case` on each case (an exception is its FAIL line), prints the verdict; returns the failures."""
    n_fail = 0
    for case in cases:
        try:
            n_fail += not check_case(**case)
        except Exception as e:  # noqa: BLE001 - report and go on
            n_fail += 1
            print(f"FAIL {case['name']}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=3)
    print(f"{label}: {'PASS' if n_fail == 0 else f'FAIL ({n_fail} cases)'}", flush=True)
    return n_fail


def bench(fn, args, repeats: int, calls: int = 10) -> float:
    """Seconds per call: the best of `repeats` rounds of `calls` back-to-back calls (one sync per round, so
    host dispatch overlaps the GPU), after a warm-up."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def sweep(b: int, n: int, repeats: int) -> None:
    """TFLOP/s of the kernel under several BlockSizes, to choose the defaults."""
    variants = {
        "default": BlockSizes(),
        "no-overlap": BlockSizes(overlap=False),
        "kv64": BlockSizes(block_kv=64),
        "kv64 s3": BlockSizes(block_kv=64, slots=3),
        "kv128 s3": BlockSizes(slots=3),
        "no-ov kv64": BlockSizes(block_kv=64, overlap=False),
        "dq kv128": BlockSizes(block_kv_dq=128),
        "dkv q128": BlockSizes(block_q_dkv=128),
        "wg2": BlockSizes(warpgroups=2),
        "wg2 no-overlap": BlockSizes(warpgroups=2, overlap=False),
        "wg2 kv64 s3": BlockSizes(warpgroups=2, block_kv=64, slots=3, head_split=False),
        "wg2 s3": BlockSizes(warpgroups=2, slots=3, head_split=False),
    }
    s = 4096
    for h in (80,):
        keys = jax.random.split(jax.random.key(h), 3)
        q, k, v = (jax.random.normal(kk, (b, s, n, h), jnp.bfloat16) for kk in keys)
        flops = 4 * b * n * s * s * h / 2
        for name, bs in variants.items():
            try:
                fn = lambda q, k, v, bs=bs: flash_attention_gpu(q, k, v, causal=True, block_sizes=bs)  # noqa: E731
                fwd = flops / bench(jax.jit(fn), (q, k, v), repeats) / 1e12
                grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
                fb = 3.5 * flops / bench(grad, (q, k, v), repeats) / 1e12
                print(f"sweep h{h} s{s} {name:>12}: fwd {fwd:6.1f}  f+b {fb:6.1f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"sweep h{h} s{s} {name:>12}: {type(e).__name__}: {str(e)[:300]}", flush=True)


ABLATIONS = {  # name: forward stages left out (BlockSizes.ablate); the output of these variants is wrong
    "whole kernel": (),
    "no masks": ("mask",),
    "no softmax": ("exp",),
    "no PV": ("pv",),
    "no QK^T": ("qk",),
    "matmuls only": ("exp", "mask"),
    "softmax only": ("qk", "pv"),
    "loads and loop only": ("qk", "pv", "exp", "mask"),
}


BWD_ABLATIONS = {  # name: backward stages left out (BlockSizes.ablate), timed as forward + backward
    "whole backward": (),
    "no exponential": ("bwd_exp",),
    "no matmuls": ("bwd_mm",),
    "loads and loop only": ("bwd_mm", "bwd_exp"),
}


def ablate(b: int, n: int, repeats: int, dims, s: int = 4096, interpret: bool = False,
           warpgroups: int = 1, head_split: bool = True, bwd_paired: bool = True) -> None:
    """A profile without hardware counters: the forward kernel's time with stages left out (BlockSizes.ablate).
    The time a stage costs on the critical path is the whole kernel's time minus the time without it."""
    print(f"\n# ablation profile, forward, warpgroups={warpgroups} head_split={head_split}, causal bf16, batch {b}, "
          f"{n} heads, seq {s}: ms per call (TFLOP/s counting the whole kernel's FLOPs)", flush=True)
    for h in dims:
        keys = jax.random.split(jax.random.key(h), 3)
        q, k, v = (jax.random.normal(kk, (b, s, n, h), jnp.bfloat16) for kk in keys)
        flops = 4 * b * n * s * s * h / 2
        whole = None
        for name, stages in ABLATIONS.items():
            bs = BlockSizes(ablate=frozenset(stages), warpgroups=warpgroups, head_split=head_split)
            try:
                fn = jax.jit(lambda q, k, v, bs=bs: flash_attention_gpu(q, k, v, causal=True, block_sizes=bs,
                                                                        interpret=interpret))
                sec = bench(fn, (q, k, v), repeats)
                whole = sec if whole is None else whole
                print(f"ablate wg{warpgroups}{' split' * head_split} h{h} {name:>20}: {1e3 * sec:8.3f} ms "
                      f"({flops / sec / 1e12:6.1f} TFLOP/s)  saves {1e3 * (whole - sec):7.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"ablate wg{warpgroups}{' split' * head_split} h{h} {name:>20}: {type(e).__name__}: "
                      f"{str(e)[:300]}", flush=True)
        # The backward kernels (dq, dk/dv): forward + backward with backward stages left out; the forward is the
        # whole one each time, so differences are the backward's.
        tag = f"wg{warpgroups}{' split' * head_split}{' paired' * bwd_paired} h{h}"
        whole = None
        for name, stages in BWD_ABLATIONS.items():
            bs = BlockSizes(ablate=frozenset(stages), warpgroups=warpgroups, head_split=head_split,
                            bwd_head_split=head_split, bwd_paired=bwd_paired)
            try:
                fn = jax.jit(jax.grad(lambda q, k, v, bs=bs: jnp.sum(flash_attention_gpu(
                    q, k, v, causal=True, block_sizes=bs, interpret=interpret).astype(jnp.float32)),
                    argnums=(0, 1, 2)))
                sec = bench(fn, (q, k, v), repeats)
                whole = sec if whole is None else whole
                print(f"ablate-bwd {tag} {name:>20}: f+b {1e3 * sec:8.3f} ms ({3.5 * flops / sec / 1e12:6.1f} "
                      f"TFLOP/s)  saves {1e3 * (whole - sec):7.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"ablate-bwd {tag} {name:>20}: {type(e).__name__}: {str(e)[:300]}", flush=True)


VARIANTS = {  # other forms of the kernel, measured against the default (BlockSizes(): the forward's head dim split
    # 64 + rest since 2026-11-27) by --variants
    "16-wide": BlockSizes(head_split=False),  # the forward in 16-wide tiles (the default before 2026-11-27)
    "wg2+split": BlockSizes(warpgroups=2),
    "wg2": BlockSizes(warpgroups=2, head_split=False),
    # 3-deep K/V pipeline: both consumers must release a slot before the producer refills it (with head_split
    # it hangs in the interpreter, and BlockSizes refuses it)
    "wg2 s3": BlockSizes(warpgroups=2, slots=3, head_split=False),
    # the backward (default since the fifth H200 run: head dim as 64 + rest, independent products issued together,
    # dq: S, dP; dk/dv: S^T, dP^T, then dV, dK) with 16-wide tiles, one product at a time, or both (the default
    # before): the forward is the default's, so only f+b is timed
    "bwd-unsplit": BlockSizes(bwd_head_split=False),
    "bwd-unpaired": BlockSizes(bwd_paired=False),
    "bwd-plain": BlockSizes(bwd_head_split=False, bwd_paired=False),
}
FWD_TIMED_ELSEWHERE = ("bwd-unsplit", "bwd-unpaired", "bwd-plain")  # the default's forward kernel
BWD_AS_DEFAULT = ("16-wide", "wg2+split", "wg2", "wg2 s3")  # forms whose backward kernels are the default's
# the same as another form at head_dim 64 (nothing to split)
SPLIT_ONLY = ("16-wide", "wg2+split", "bwd-unsplit", "bwd-plain")


def variants_check(b: int = 4, n: int = 32, s: int = 4096, repeats: int = 3, check: bool = True,
                   dims=(64, 80), only: str | None = None) -> int:
    """The kernel forms other than the default (`VARIANTS`: 16-wide tiles, two consumer warpgroups, the backward's
    head split, the paired backward): numerics against the reference (unless `check` is false; `only`: the cases
    whose name holds one of its comma-separated texts), then TFLOP/s against the default and cuDNN at the head
    dims `dims`, with ratios. Returns the number of failed numerics cases."""
    # the numerics cases' forms, by what they split (the default splits all three kernels and pairs the backward's
    # products; `split` waits on them one by one)
    wg2, split, both = VARIANTS["wg2"], VARIANTS["bwd-unpaired"], BlockSizes(warpgroups=2)
    cases = [  # block_kv=64 makes a causal CTA's first warpgroup need fewer key blocks than its second
        dict(name="wg2 h80 causal GQA 8:2 left/right padding T=S=300 kv64", batch=2, t=300, s=300, n=8, kv=2, h=80,
             kind="left", bs=BlockSizes(warpgroups=2, block_kv=64, head_split=False)),
        dict(name="wg2 h64 causal packed segments GQA 4:2 T=S=256", batch=2, t=256, s=256, n=4, kv=2, h=64,
             kind="packed", bs=wg2),
        dict(name="wg2 h80 float16 non-causal padding no-overlap T=S=129", batch=2, t=129, s=129, n=4, kv=4, h=80,
             causal=False, kind="left", dt=jnp.float16, bs=BlockSizes(warpgroups=2, overlap=False,
                                                                       head_split=False)),
        dict(name="wg2 h80 causal q_offset 100 T=37 S=137", batch=2, t=37, s=137, n=4, kv=2, h=80, q_offset=100,
             bs=wg2),
        dict(name="bwd-unpaired h80 causal GQA 8:2 left/right padding T=S=300", batch=2, t=300, s=300, n=8, kv=2, h=80,
             kind="left", bs=split),
        dict(name="bwd-unpaired h80 causal packed segments T=S=256", batch=2, t=256, s=256, n=4, kv=2, h=80,
             kind="packed", bs=split),
        dict(name="default h96 float16 non-causal padding no-overlap T=S=129", batch=2, t=129, s=129, n=4, kv=4, h=96,
             causal=False, kind="left", dt=jnp.float16, bs=BlockSizes(overlap=False)),
        dict(name="wg2+split h80 causal GQA 8:2 left/right padding T=S=300 kv64", batch=2, t=300, s=300, n=8, kv=2,
             h=80, kind="left", bs=BlockSizes(warpgroups=2, block_kv=64)),
        dict(name="wg2+split h80 causal q_offset 100 T=37 S=137", batch=2, t=37, s=137, n=4, kv=2, h=80,
             q_offset=100, bs=both),
        dict(name="wg2 s3 h80 causal GQA 8:2 left/right padding T=S=300 kv64", batch=2, t=300, s=300, n=8, kv=2,
             h=80, kind="left", bs=BlockSizes(warpgroups=2, block_kv=64, slots=3, head_split=False)),
        dict(name="wg2 s3 h80 causal q_offset 263 T=37 S=300", batch=2, t=37, s=300, n=4, kv=2, h=80,
             q_offset=263, bs=VARIANTS["wg2 s3"]),
        dict(name="bwd-unsplit h80 causal GQA 8:2 left/right padding T=S=300", batch=2, t=300, s=300, n=8, kv=2,
             h=80, kind="left", bs=VARIANTS["bwd-unsplit"]),
        dict(name="default h64 causal packed segments GQA 4:2 T=S=256", batch=2, t=256, s=256, n=4, kv=2, h=64,
             kind="packed", bs=BlockSizes()),
        dict(name="default h80 causal q_offset 100 T=37 S=137 s3", batch=2, t=37, s=137, n=4, kv=2, h=80,
             q_offset=100, bs=BlockSizes(slots=3)),
        dict(name="default h80 float16 non-causal padding T=S=129", batch=2, t=129, s=129, n=4, kv=4, h=80,
             causal=False, kind="left", dt=jnp.float16, bs=BlockSizes()),
        # nothing to mask (a whole key block, no ids): failed at trace time before 2026-11-27 (the kernel fuzz)
        dict(name="default h64 non-causal no padding T=37 S=128", batch=2, t=37, s=128, n=4, kv=2, h=64,
             causal=False, bs=BlockSizes()),
    ]
    cases = [c for c in cases if only is None or any(o in c["name"] for o in only.split(","))]
    n_fail = check_cases(cases, "variants numerics") if check else 0

    print(f"\n# kernel variants: TFLOP/s, causal bf16, batch {b}, {n} heads, seq {s} (f+b = 3.5x forward FLOPs)",
          flush=True)
    impls = {"default": BlockSizes(), "cudnn": None, **VARIANTS}  # the baselines first: a cut-short run keeps them
    for h in dims:
        keys = jax.random.split(jax.random.key(s + h), 3)
        q, k, v = (jax.random.normal(kk, (b, s, n, h), jnp.bfloat16) for kk in keys)
        flops = 4 * b * n * s * s * h / 2
        got = {}
        for name, bs in impls.items():
            if name in SPLIT_ONLY and h % 64 == 0:
                continue  # (nothing to split)
            if bs is None:
                fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                                  implementation="cudnn")
            else:
                fn = lambda q, k, v, bs=bs: flash_attention_gpu(q, k, v, causal=True, block_sizes=bs)  # noqa: E731
            for mode in ("fwd", "f+b"):
                if (mode == "f+b" and name in BWD_AS_DEFAULT) or (mode == "fwd" and name in FWD_TIMED_ELSEWHERE):
                    continue  # (the same kernels as the default in that direction)
                try:
                    f = jax.jit(fn) if mode == "fwd" else jax.jit(jax.grad(
                        lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
                    sec = bench(f, (q, k, v), repeats)
                    got[name, mode] = flops * (1 if mode == "fwd" else 3.5) / sec / 1e12
                    print(f"variant-bench h{h} s{s} {name:>9} {mode}: {1e3 * sec:8.3f} ms  "
                          f"{got[name, mode]:6.1f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"variant-bench h{h} s{s} {name:>9} {mode}: {type(e).__name__}: {str(e)[:300]}",
                          flush=True)
        for mode in ("fwd", "f+b"):
            for name in (*VARIANTS, "cudnn"):
                if ("default", mode) in got and (name, mode) in got:
                    print(f"variant-bench h{h} s{s} {mode}: {name} / default = "
                          f"{got[name, mode] / got['default', mode]:.2f}x", flush=True)
    return n_fail


def decode_bench(repeats: int, kv_len: int = 2048, interpret: bool = False, layers: int = 32,
                 splits: tuple[int, ...] = (2, 4, 16)) -> None:
    """The decode kernel (phi_jax/kernels/decode_attention_gpu.py): one query per sequence against a `kv_len`-token
    cache, phi-2's heads (32 x 80), bf16, at batch 1 and 8, against the KV-cache read floor (K and V bytes / the
    copy bandwidth measured here) and the xla path. Goal (issue 10): within 1.5x of the floor.

    Timed as the model runs it: one jitted program of `layers` attentions, each over its own layer's cache and
    taking the previous one's output as its query, so that the time per layer is device time (a single call of a
    few microseconds is bounded by the host's dispatch instead). The single-call time is printed beside it."""
    from phi_jax.kernels.decode_attention_gpu import decode_attention_gpu, decode_flops_and_bytes, default_splits
    x = jnp.ones((1 << 28) // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    bandwidth = 2 * x.nbytes / bench(copy, (x,), repeats)
    print(f"\n# decode attention, bf16, 32 heads x 80, cache {kv_len}; copy bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"(read + write); per layer = one program of {layers} layers' attentions / {layers}", flush=True)
    for b in (1, 8):
        keys = jax.random.split(jax.random.key(b), 2 * layers + 1)
        q = jax.random.normal(keys[0], (b, 1, 32, 80), jnp.bfloat16)
        ks = tuple(jax.random.normal(kk, (b, kv_len, 32, 80), jnp.bfloat16) for kk in keys[1:layers + 1])
        vs = tuple(jax.random.normal(kk, (b, kv_len, 32, 80), jnp.bfloat16) for kk in keys[layers + 1:])
        _, nbytes = decode_flops_and_bytes(b, 1, 32, 32, kv_len, 80, 2)
        floor = nbytes / bandwidth
        fns = {
            f"pallas (splits {default_splits(b, 32, kv_len, 128)})": lambda q, k, v, off: decode_attention_gpu(
                q, k, v, q_offset=off, interpret=interpret),
            "xla": lambda q, k, v, off: attention_reference(q, k, v, q_offset=off),
        }
        if b == 1:  # other split counts (the default's choice is not measured against them yet) and 16-wide tiles
            for n in splits:
                fns[f"pallas splits {n}"] = lambda q, k, v, off, n=n: decode_attention_gpu(
                    q, k, v, q_offset=off, num_splits=n, interpret=interpret)
            fns["pallas 16-wide"] = lambda q, k, v, off: decode_attention_gpu(
                q, k, v, q_offset=off, block_sizes=BlockSizes(head_split=False), interpret=interpret)
        for name, fn in fns.items():
            def stack(q, ks, vs, off, fn=fn):  # the layers in turn, as the model's unrolled decode step
                for k, v in zip(ks, vs):
                    q = fn(q, k, v, off)
                return q
            try:
                off = jnp.int32(kv_len - 1)
                sec = bench(jax.jit(stack), (q, ks, vs, off), repeats) / layers
                # a single call (host-bound) only for the two baselines: each timing is a compile of its own
                single = (f"; single call {1e6 * bench(jax.jit(fn), (q, ks[0], vs[0], off), repeats):.1f} us"
                          if name == "xla" or name.startswith("pallas (") else "")
                print(f"decode b{b} {name:>18}: {1e6 * sec:8.1f} us per layer = {sec / floor:5.2f}x the floor "
                      f"({1e6 * floor:.1f} us for {nbytes / 1e6:.1f} MB){single}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"decode b{b} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        out = decode_attention_gpu(q, ks[0], vs[0], q_offset=kv_len - 1, interpret=interpret)
        err = rel_err(out, attention_reference(q, ks[0], vs[0], q_offset=kv_len - 1))
        print(f"{'PASS' if err <= 2e-2 else 'FAIL'} decode b{b} numerics: rel err {err:.2e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="numerics and seq 4096 only")
    p.add_argument("--seqs", default="1024,4096,8192")
    p.add_argument("--sweep", action="store_true", help="time block-size variants of the kernel (h64/h80, seq 4096)")
    p.add_argument("--dims", default="64,80,128")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--ablate", action="store_true", help="profile the forward by leaving stages out (h64/h80)")
    p.add_argument("--skip-table", action="store_true", help="no TFLOP/s table")
    p.add_argument("--warpgroups", default="1", help="--ablate: profile these BlockSizes.warpgroups (e.g. 1,2)")
    p.add_argument("--head-split", default="1", help="--ablate: profile these BlockSizes.head_split (and "
                   "bwd_head_split) (e.g. 0,1)")
    p.add_argument("--bwd-paired", default="1", help="--ablate: profile these BlockSizes.bwd_paired (e.g. 0,1)")
    p.add_argument("--variants", action="store_true",
                   help="only: the opt-in kernel forms' numerics (PASS/FAIL) and TFLOP/s against the default")
    p.add_argument("--check-only", default=None, metavar="TEXT",
                   help="--variants: only the numerics cases whose name holds one of the comma-separated TEXTs "
                        "(e.g. s3,bwd-unsplit)")
    p.add_argument("--decode", action="store_true", help="the decode kernel against the KV-cache read floor")
    p.add_argument("--layers", type=int, default=32, help="--decode: attentions per timed program (each its own "
                   "kernel call, compiled with the program: fewer compile faster)")
    args = p.parse_args()

    dev = jax.devices()[0]
    print(f"# gpu_attention  date {datetime.datetime.now().isoformat(timespec='seconds')}  device {dev.device_kind} "
          f"({dev.platform})  jax {jax.__version__}  python {platform.python_version()}", flush=True)
    if args.variants:
        n_fail = variants_check(args.batch, args.heads, repeats=min(args.repeats, 3), check=not args.skip_check,
                                dims=[h for h in (64, 80) if str(h) in args.dims.split(",")], only=args.check_only)
        if not args.skip_check:
            print(f"\n{'PASS' if n_fail == 0 else 'FAIL'} gpu_attention --variants numerics", flush=True)
        return

    n_fail = 0
    if not args.skip_check:
        cases = [
            dict(name="h64 causal GQA 8:2 left/right padding T=S=300", batch=2, t=300, s=300, n=8, kv=2, h=64,
                 kind="left"),
            dict(name="h80 causal GQA 8:2 left/right padding T=S=300", batch=2, t=300, s=300, n=8, kv=2, h=80,
                 kind="left"),
            dict(name="h80 causal packed segments GQA 4:2 T=S=256", batch=2, t=256, s=256, n=4, kv=2, h=80,
                 kind="packed"),
            dict(name="h80 float16 non-causal padding T=S=129", batch=2, t=129, s=129, n=4, kv=4, h=80,
                 causal=False, kind="left", dt=jnp.float16),
            dict(name="h80 causal q_offset 100 T=37 S=137", batch=2, t=37, s=137, n=4, kv=2, h=80, q_offset=100),
        ]
        n_fail += check_cases(cases, "numerics")

    if args.sweep:
        sweep(args.batch, args.heads, args.repeats)
    if args.ablate:
        for wgs in (int(x) for x in args.warpgroups.split(",")):
            for split in (bool(int(x)) for x in args.head_split.split(",")):
                for paired in (bool(int(x)) for x in args.bwd_paired.split(",")):
                    ablate(args.batch, args.heads, args.repeats,
                           [h for h in (64, 80) if str(h) in args.dims.split(",")], warpgroups=wgs, head_split=split,
                           bwd_paired=paired)
    if args.decode:
        decode_bench(args.repeats, layers=args.layers)
    if args.skip_table:
        return
    seqs = [4096] if args.quick else [int(x) for x in args.seqs.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    b, n = args.batch, args.heads
    impls = {
        "pallas": lambda q, k, v: flash_attention_gpu(q, k, v, causal=True),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "xla": lambda q, k, v: attention_reference(q, k, v, causal=True),
    }
    print(f"\n# TFLOP/s, causal bf16, batch {b}, {n} heads (fwd+bwd counted as 3.5x forward FLOPs)")
    print(f"{'head_dim':>8} {'seq':>6} " + " ".join(f"{name + ' fwd':>12} {name + ' f+b':>12}" for name in impls),
          flush=True)
    for h in dims:
        for s in seqs:
            keys = jax.random.split(jax.random.key(s + h), 3)
            q, k, v = (jax.random.normal(kk, (b, s, n, h), jnp.bfloat16) for kk in keys)
            flops = 4 * b * n * s * s * h / 2
            row = []
            for name, fn in impls.items():
                for mode in ("fwd", "f+b"):
                    if name == "xla" and s * s * b * n * 4 > (8 << 30) // (1 if mode == "fwd" else 3):
                        row.append(f"{'(mem)':>12}")  # the reference materialises the scores
                        continue
                    try:
                        if mode == "fwd":
                            f = jax.jit(fn)
                        else:
                            f = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                                 argnums=(0, 1, 2)))
                        sec = bench(f, (q, k, v), args.repeats)
                        row.append(f"{flops * (1 if mode == 'fwd' else 3.5) / sec / 1e12:12.1f}")
                    except Exception as e:  # noqa: BLE001
                        row.append(f"{'ERR':>12}")
                        print(f"  {name} {mode} h{h} s{s}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            print(f"{h:>8} {s:>6} " + " ".join(row), flush=True)
    print(f"\n{'PASS' if n_fail == 0 else 'FAIL'} gpu_attention numerics", flush=True)


if __name__ == "__main__":
    main()
