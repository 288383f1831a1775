"""Train-step throughput: phi_jax's jitted step against transformers + torch.optim.AdamW, one process.

CPU (default): a small Phi (hidden 256, 4 layers, 8 heads, vocab 2048), batch 4 x 128 tokens, float32, both
sides the same step (forward, causal-LM loss, backward, grad-norm clipping, AdamW) with the same thread count.
Prints tokens/s of each and the ratio (goal >= 1.2x: the median of rounds that time one step of each in turn),
the loss of both on the same first batch, and both libraries' plain matmul speed at the step's shapes (the ceiling).

GPU (`--gpu`): phi-2 geometry with random weights, bf16 compute over float32 master weights and AdamW state,
seq 2048, per-layer remat. Compiles the step once at `--batch` (default 8), times `--repeats` steps, prints model
FLOPs utilisation against the chip's dense bf16 peak (H100/H200: 989 TFLOP/s) and XLA's memory analysis.
`--find-max` also compiles the step at twice the batch, takes the largest batch that fits from the slope of the
temporaries (parameters and optimizer state fixed), and runs the step at it. Attention: cuDNN flash attention
(`--attn xla` for the plain path). One policy finishes in under 3 minutes on an H100/H200.

    python benchmarks/train.py [--threads 2] [--repeats 15] [--profile TOP] [--phases]
    python benchmarks/train.py --gpu [--batch 8] [--remat nothing_saveable[,POLICY...]] [--attn cudnn] [--find-max]
    (either) [--products 3d]: the projections on [B, T, D] operands, the form before 2026-11-27 (an A/B)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time

if __name__ == "__main__" and "--gpu" not in sys.argv:  # (imported, e.g. by gpu_profile.py: the caller's devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_env import median_time, patched  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12, "TPU v4": 275e12,
             "TPU v5p": 459e12, "TPU v6 lite": 918e12}
CPU_GEOMETRY = dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=8, partial_rotary_factor=0.5)


def three_d_products():
    """Programs traced inside run the projections and the LM head on `[B, T, D]` operands, as phi_jax did before
    `projection.over_rows` (an A/B of that change)."""
    from phi_jax.modeling import model, projection
    stack = contextlib.ExitStack()
    for module in (projection, model):
        stack.enter_context(patched(module, "over_rows", lambda fn, x: fn(x)))
    return stack


def train_flops(cfg, batch: int, seq: int, remat: bool) -> float:
    """Model FLOPs of one step: 3x the forward's matmul FLOPs (forward + backward); recomputation not counted,
    attention counted as the full T x T product (as PaLM's MFU)."""
    d, f, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    tokens = batch * seq
    per_layer = 2 * tokens * (2 * d * d + 2 * d * kv + 2 * d * f) + 2 * 2 * batch * seq * seq * d
    return 3 * (n * per_layer + 2 * tokens * d * v)


def header(extra: str = "") -> None:
    import flax
    import optax
    dev = jax.devices()[0]
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; device: {dev.device_kind} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores); jax {jax.__version__}, "
          f"flax {flax.__version__}, optax {optax.__version__}{extra}")


def jax_step(model, batch_size: int, seq: int, remat: str | None, lr: float = 1e-4):
    """(state, step_fn, batch) for phi_jax's train step on one device."""
    from phi_jax.sharding import make_mesh
    from phi_jax.train.loop import build
    from phi_jax.train.step import TrainConfig, make_optimizer, split_model
    split = split_model(model, remat_policy=remat)
    tx = make_optimizer(TrainConfig(learning_rate=lr, total_steps=1000))
    state, frozen, step_fn, batch_sh = build(split, tx, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch_size, seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
             "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()}
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    return state, frozen, step_fn, batch


def cpu(args) -> None:
    import tempfile

    import torch
    import transformers

    from phi_jax.modeling.model import PhiForCausalLM
    from phi_jax.parity import random_checkpoint

    torch.set_num_threads(args.threads)
    header(f", torch {torch.__version__}, transformers {transformers.__version__}; torch threads {args.threads}, "
           f"cores usable {len(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory() as d:
        tmodel = random_checkpoint(d, **CPU_GEOMETRY)
        model = PhiForCausalLM.from_pretrained(d)
    b, t = args.batch or 4, args.seq or 128
    print(f"model: hidden {CPU_GEOMETRY['hidden_size']}, {CPU_GEOMETRY['num_hidden_layers']} layers, vocab "
          f"{CPU_GEOMETRY['vocab_size']}; batch {b} x {t} tokens, float32, AdamW + clipping")
    state, frozen, step_fn, batch = jax_step(model, b, t, args.remat)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, frozen, batch, None)
    jax_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0

    def run_jax():
        nonlocal state
        state, m = step_fn(state, frozen, batch, None)
        jax.block_until_ready(m["loss"])

    tmodel.train()
    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(np.array(batch["input_ids"])).long()

    def run_torch():
        opt.zero_grad(set_to_none=True)
        loss = tmodel(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        opt.step()
        return loss.item()

    torch_loss = run_torch()
    run_jax()
    args.repeats = args.repeats or 15
    # Interleaved, round by round: on a shared host the load drifts within seconds, so each round's ratio
    # compares the two steps under the same conditions; the median of the rounds is the figure.
    t_jax, t_torch = [], []
    for _ in range(args.repeats):
        for run, times in ((run_jax, t_jax), (run_torch, t_torch)):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    ratios = sorted(t / j for t, j in zip(t_torch, t_jax))
    tj, tt = float(np.median(t_jax)), float(np.median(t_torch))
    tokens = b * t
    print(f"phi_jax step     : {1e3 * tj:8.1f} ms  {tokens / tj:9.0f} tokens/s  (compile {compile_s:.1f} s)")
    print(f"transformers step: {1e3 * tt:8.1f} ms  {tokens / tt:9.0f} tokens/s")
    print(f"speed-up over transformers: {float(np.median(ratios)):.2f}x (goal >= 1.2x): median of {args.repeats} "
          f"interleaved rounds (range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    print(f"first-step loss: phi_jax {jax_loss:.6f}, transformers {torch_loss:.6f}")
    matmul_ceiling(tokens, CPU_GEOMETRY, args.repeats)
    if args.phases:
        phases(model, tmodel, batch, ids, args.repeats, (state, frozen, step_fn))
    if args.profile:  # where the phi_jax step's time goes: per op category, phase and matmul form
        from device_profile import hlo_report, profile_calls
        summary = profile_calls(run_jax, calls=3, top=args.profile, label="cpu train step")
        text = step_fn.lower(state, frozen, batch, None).compile().as_text()
        print(hlo_report(summary, text, top=args.profile, label="cpu train step"))


def phases(model, tmodel, batch, ids, repeats: int, step) -> None:
    """Where the two steps differ: the forward (loss only), forward + backward (gradients) and the whole step
    (with clipping and AdamW) of each library, timed in interleaved rounds; the optimizer is the step minus the
    gradients, the backward the gradients minus the forward."""
    import torch

    from phi_jax.train.step import make_loss_fn, split_model
    state, frozen, step_fn = step
    loss_fn = make_loss_fn(split_model(model))  # (the structure; the values are the step's current parameters)
    params = jax.tree.map(jnp.copy, state["params"])  # the step donates its state; these copies stay
    fwd = jax.jit(lambda p, b: loss_fn(p, {}, b, None)[0])
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, {}, b, None)[0]))
    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4, weight_decay=0.0)

    def t_fwd():
        with torch.no_grad():
            tmodel(ids, labels=ids).loss.item()

    def t_grad():
        tmodel.zero_grad(set_to_none=True)
        tmodel(ids, labels=ids).loss.backward()

    def t_step():
        t_grad()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        opt.step()

    def j_step():
        nonlocal state
        state, m = step_fn(state, frozen, batch, None)
        jax.block_until_ready(m["loss"])
    runs = {"phi_jax forward": lambda: jax.block_until_ready(fwd(params, batch)),
            "phi_jax fwd+bwd": lambda: jax.block_until_ready(grad(params, batch)), "phi_jax step": j_step,
            "torch forward": t_fwd, "torch fwd+bwd": t_grad, "torch step": t_step}
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    for lib in ("phi_jax", "torch"):
        f, fb, st = ms[f"{lib} forward"], ms[f"{lib} fwd+bwd"], ms[f"{lib} step"]
        print(f"phases {lib:<8}: forward {f:6.1f} ms, backward {fb - f:6.1f} ms, optimizer {st - fb:6.1f} ms "
              f"(step {st:6.1f} ms; medians of {repeats} interleaved rounds)")
    for name, a, b in (("forward", "forward", None), ("backward", "fwd+bwd", "forward"), ("optimizer", "step",
                                                                                          "fwd+bwd")):
        j = ms[f"phi_jax {a}"] - (ms[f"phi_jax {b}"] if b else 0.0)
        t = ms[f"torch {a}"] - (ms[f"torch {b}"] if b else 0.0)
        print(f"phases {name:<9}: torch / phi_jax = {t / j:.2f}x")


def matmul_ceiling(tokens: int, geometry: dict, repeats: int) -> None:
    """The two libraries' plain float32 matmul speed at the step's shapes, in the same run: the ceiling the step
    ratio is judged against (it differs between hosts: XLA 1.1-2x torch on some, below torch on others)."""
    import torch
    d, f, v = geometry["hidden_size"], geometry["intermediate_size"], geometry["vocab_size"]
    rng = np.random.default_rng(0)
    total_jax = total_torch = 0.0
    for k, n in ((d, d), (d, f), (f, d), (d, v)):
        a, b = rng.standard_normal((tokens, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        mm = jax.jit(lambda x, y: x @ y)
        tj = median_time(lambda: mm(ja, jb).block_until_ready(), max(repeats, 20))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tt = median_time(lambda: ta @ tb, max(repeats, 20))
        total_jax, total_torch = total_jax + tj, total_torch + tt
        flops = 2 * tokens * k * n
        print(f"matmul [{tokens}, {k}] x [{k}, {n}]: XLA {flops / tj / 1e9:6.1f} GFLOP/s, torch "
              f"{flops / tt / 1e9:6.1f} GFLOP/s")
    print(f"matmul ceiling: XLA / torch = {total_torch / total_jax:.2f}x over these four shapes, this run (compare "
          f"the step's speed-up with it)")


def gpu(args) -> None:
    from flax import nnx

    from phi_jax.config import PhiConfig, phi_2
    from phi_jax.modeling.model import PhiForCausalLM

    header()
    args.repeats = args.repeats or 5
    if args.tiny:
        tiny = {k: v for k, v in CPU_GEOMETRY.items() if k != "partial_rotary_factor"}
        cfg = PhiConfig(**tiny, rope_parameters=dict(partial_rotary_factor=CPU_GEOMETRY["partial_rotary_factor"]))
    else:
        cfg = phi_2()
    seq = args.seq or (2048 if not args.tiny else 128)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    capacity = args.capacity_gib * 2**30 if args.capacity_gib else (jax.devices()[0].memory_stats() or {}).get(
        "bytes_limit")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.eval_shape(
        lambda: nnx.state(PhiForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))))
    print(f"model: {'phi-2' if not args.tiny else 'tiny'} geometry, {n_params / 1e9:.3f} B parameters, bf16 compute, "
          f"float32 master weights + AdamW state; seq {seq}; attention {args.attn}")
    from phi_jax.modeling.remat import remat_policy
    for policy in args.remat.split(","):
        try:
            if policy != "none":
                remat_policy(policy)  # a ValueError naming it when unknown
        except ValueError as e:
            print(f"remat {policy}: {e}; skipped", flush=True)
            continue
        try:
            gpu_config(args, cfg, seq, None if policy == "none" else policy, peak, capacity, kind)
        except Exception as e:  # noqa: BLE001 - the next policy still runs
            print(f"remat {policy}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def gpu_config(args, cfg, seq, remat, peak, capacity, kind) -> None:
    """One remat policy: step time, MFU and XLA's memory at --batch (halved on out-of-memory)."""
    from flax import nnx

    from phi_jax.modeling.model import PhiForCausalLM

    def make_model():  # random weights made on the device (float32 masters), bf16 compute; the first step takes
        # (donates) the model's arrays: a fresh model for every measurement
        return nnx.jit(lambda: PhiForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                              attn_implementation=args.attn, rngs=nnx.Rngs(0)))()

    def measure(batch_size: int, slope: bool = True):
        state, frozen, step_fn, batch = jax_step(make_model(), batch_size, seq, remat)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, frozen, batch, None).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, m = compiled(state, frozen, batch, None)
        jax.block_until_ready(m["loss"])

        def run():
            nonlocal state
            state, mm = compiled(state, frozen, batch, None)
            jax.block_until_ready(mm["loss"])

        t = median_time(run, args.repeats)
        mem2 = None
        if slope and args.find_max and capacity:  # the step compiled (not run) at twice the batch
            big = {k: jax.ShapeDtypeStruct((2 * batch_size,) + v.shape[1:], v.dtype, sharding=v.sharding)
                   for k, v in batch.items()}
            mem2 = step_fn.lower(state, frozen, big, None).compile().memory_analysis()
        del state
        return t, compile_s, mem, float(m["loss"]), mem2

    b = args.batch or 8
    while True:
        try:
            t, compile_s, mem, loss, mem2 = measure(b)
            break
        except Exception as e:  # XLA's RESOURCE_EXHAUSTED
            oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            if not oom and args.attn != "xla":
                print(f"attention {args.attn} failed ({str(e).splitlines()[0][:200]}); retrying with xla")
                args.attn = "xla"
                continue
            if not oom or b == 1:
                raise
            print(f"remat {remat}, batch {b}: out of memory; halving")
            b //= 2
    flops = train_flops(cfg, b, seq, remat is not None)
    tokens = b * seq
    print(f"remat {remat}, batch {b} x {seq}: {1e3 * t:.1f} ms/step, {tokens / t:,.0f} tokens/s, compile "
          f"{compile_s:.1f} s, loss {loss:.3f}")
    if peak:
        print(f"MFU: {100 * flops / t / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s dense bf16 ({kind}; remat {remat}, "
              f"batch {b}; goal >= 45%)")
    else:
        print(f"model FLOP rate: {flops / t / 1e12:.1f} TFLOP/s (no peak known for {kind})")
    if mem is not None:
        fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        temp = mem.temp_size_in_bytes
        line = f"XLA memory: parameters + optimizer state {fixed / 2**30:.1f} GiB, temporaries {temp / 2**30:.1f} GiB"
        if capacity and mem2 is not None:
            # temporaries grow linearly with the batch: their slope from the step compiled at 2x the batch
            per_row = (mem2.temp_size_in_bytes - temp) / b
            est = b + int((capacity - fixed - temp) / per_row) if per_row > 0 else None
            line += (f"; at batch {2 * b} {mem2.temp_size_in_bytes / 2**30:.1f} GiB; device {capacity / 2**30:.1f} "
                     f"GiB -> largest batch about {est} (temporaries linear in the batch)")
            print(line)
            # the estimate, then 90% of it once if that does not fit (the allocator's fragmentation)
            for size in dict.fromkeys(x for x in (est, int(0.9 * (est or 0))) if x and x > b):
                try:
                    t2, _, _, _, _ = measure(size, slope=False)
                except Exception as e:
                    print(f"batch {size} does not fit: {str(e).splitlines()[0][:200]}")
                    continue
                f2 = train_flops(cfg, size, seq, remat is not None)
                print(f"batch {size} fits: {1e3 * t2:.1f} ms/step, {size * seq / t2:,.0f} tokens/s"
                      + (f", MFU {100 * f2 / t2 / peak:.1f}%" if peak else ""))
                break
        else:
            print(line)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true", help="phi-2 geometry on the accelerator")
    p.add_argument("--tiny", action="store_true", help="with --gpu: the small CPU geometry (checks the script)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 15 interleaved rounds on "
                   "the CPU, 5 on the accelerator)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: the "
                   "cores this process may run on; under `taskset -c 0` one)")
    p.add_argument("--profile", type=int, default=0, metavar="TOP", help="CPU: also profile the phi_jax step (per "
                   "op category, phase, matmul form) and list its TOP slowest ops")
    p.add_argument("--phases", action="store_true", help="CPU: also time forward, forward + backward and the "
                   "whole step of both libraries (where the steps differ)")
    p.add_argument("--remat", default=None, help="jax.checkpoint_policies name or phi_jax's "
                   "dots_and_attention_saveable; --gpu default nothing_saveable (--gpu: a comma list measures each, "
                   "e.g. dots_with_no_batch_dims_saveable,dots_and_attention_saveable)")
    p.add_argument("--attn", default="cudnn", choices=("xla", "cudnn", "pallas", "auto"),
                   help="with --gpu: attention implementation (cudnn flash attention by default; xla materialises "
                        "the scores)")
    p.add_argument("--capacity-gib", type=float, default=None, help="device memory (default: the device's)")
    p.add_argument("--find-max", action="store_true", help="with --gpu: estimate the largest batch "
                   "(the step compiled again at twice --batch: temporaries' slope) and run the step at it")
    p.add_argument("--products", default="rows", choices=("rows", "3d"), help="the projections' and LM head's "
                   "operands: as rows `[B * T, D]` (the library's form) or `[B, T, D]` (its form before 2026-11-27)")
    args = p.parse_args()
    with three_d_products() if args.products == "3d" else contextlib.nullcontext():
        if args.products == "3d":
            print("products: 3-d operands ([B, T, D] @ [D, F]), not the library's rows")
        if args.gpu:
            args.remat = args.remat or "nothing_saveable"
            gpu(args)
        else:
            cpu(args)


if __name__ == "__main__":
    main()
