"""Device-time profiles of the programs behind the open GPU goals, to say what limits each (profile, not guess).

  forward  phi-2 geometry (random weights, bf16) forward at batch 4 x 2048, attention cudnn and pallas (issue 10:
           >= 1.5x transformers)
  ttft     `generate(max_new_tokens=1)` of a 128-token prompt at batch 1 and 8 (issue 11: time to first token)
  train    the fine-tuning step (float32 masters, bf16 compute, AdamW), batch 8 x 2048, remat nothing_saveable and
           dots_with_no_batch_dims_saveable (or `--remat`), cuDNN attention (issue 12: MFU); with `hlo_report`'s
           matmul TFLOP/s per operand form and time per phase (forward, backward, optimizer)

Each prints `benchmarks/device_profile.py`'s report: wall and device-busy time per call, time per category
(matmul, attention, elementwise fusion, reduction, copy) and the top XLA ops with their kernels; forward and
train also each matmul's TFLOP/s from the program's HLO (`hlo_report`). `--hlo-dir DIR`
also writes each program's optimized HLO (gzip), to read what a fusion holds. `--tiny` runs the same on a small
model (checks the script on the CPU).

    python benchmarks/gpu_profile.py [--what forward,ttft,train] [--remat POLICY,...] [--top 25] [--hlo-dir DIR]
                                     [--tiny]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import sys

# XLA:GPU runs a program's kernels inside CUDA graphs ("command buffers"), which the profiler's trace shows as one
# op per graph (the fourth H200 run's forward profile: one "command_buffer_1" of 729 kernels, 100% of the time).
# Off here, so that each kernel is its own op; launches then cost a little more device idle time, not kernel time.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_profile import cublas_summary, hlo_report, profile_calls  # noqa: E402

import phi_jax  # noqa: E402

TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)


def config(args, **kw):
    base = dict(TINY) if args.tiny else dict(num_hidden_layers=args.layers)
    return phi_jax.phi_2(**base, eos_token_id=None, bos_token_id=None, pad_token_id=None, **kw)


def random_model(cfg, dtype, attn):
    """A model with random weights made on the device."""
    return nnx.jit(lambda: phi_jax.PhiForCausalLM(cfg, dtype=dtype, param_dtype=dtype, attn_implementation=attn,
                                                  rngs=nnx.Rngs(0)))()


def write_hlo(args, name: str, compiled) -> None:
    if not args.hlo_dir:
        return
    os.makedirs(args.hlo_dir, exist_ok=True)
    path = os.path.join(args.hlo_dir, f"{name}.hlo.txt.gz")
    with gzip.open(path + ".tmp", "wt") as f:
        f.write(compiled.as_text())
    os.replace(path + ".tmp", path)


def matmul_report(args, summary: dict, compiled, label: str) -> None:
    """`hlo_report` of a profiled program: each matmul's TFLOP/s (by operand form) and the time per phase."""
    try:
        text = compiled.as_text()
        print(hlo_report(summary, text, top=args.top, label=label), flush=True)
        print(cublas_summary(text, label), flush=True)  # float32 or 16-bit results, fused bias/activation
    except Exception as e:  # noqa: BLE001 - the profile printed before stands without it
        print(f"hlo_report {label}: {type(e).__name__}: {e}", flush=True)


def forward(args) -> None:
    b, t = (2, 64) if args.tiny else (4, 2048)
    cfg = config(args)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    for attn in ("cudnn", "pallas"):
        try:
            graphdef, state = nnx.split(random_model(cfg, jnp.bfloat16, attn))
            fwd = jax.jit(lambda state, ids, graphdef=graphdef: nnx.merge(graphdef, state)(ids).logits)
            compiled = fwd.lower(state, ids).compile()
            write_hlo(args, f"forward_{attn}", compiled)
            run = lambda: jax.block_until_ready(compiled(state, ids))  # noqa: E731
            run()
            summary = profile_calls(run, calls=3, top=args.top, label=f"forward {attn} b{b}x{t}")
            matmul_report(args, summary, compiled, f"forward {attn}")
            del state
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"profile forward {attn}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def ttft(args) -> None:
    from phi_jax.generation.generate import bucket_length
    cfg = config(args)
    model = random_model(cfg, jnp.bfloat16, "auto")
    t = 16 if args.tiny else 128
    for b in (1, 8):
        try:
            ids = np.random.default_rng(b).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
            kw = dict(eos_token_id=[], pad_token_id=0, cache_length=bucket_length(t) + 1)
            run = lambda: model.generate(ids, max_new_tokens=1, **kw)  # noqa: E731 (returns a host array)
            run()
            profile_calls(run, calls=5, top=args.top, label=f"ttft b{b}x{t}")
        except Exception as e:  # noqa: BLE001
            print(f"profile ttft b{b}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def train(args) -> None:
    from train import jax_step  # benchmarks/train.py
    cfg = config(args)
    b, t = (2, 64) if args.tiny else (8, 2048)
    for remat in args.remat.split(","):
        try:
            model = nnx.jit(lambda: phi_jax.PhiForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                           attn_implementation="cudnn", rngs=nnx.Rngs(0)))()
            state, frozen, step_fn, batch = jax_step(model, b, t, remat)
            del model
            compiled = step_fn.lower(state, frozen, batch, None).compile()
            write_hlo(args, f"train_{remat}", compiled)
            box = [state]

            def run():
                box[0], m = compiled(box[0], frozen, batch, None)
                jax.block_until_ready(m["loss"])
            run()
            summary = profile_calls(run, calls=2, top=args.top, label=f"train {remat} b{b}x{t}")
            matmul_report(args, summary, compiled, f"train {remat}")
            del box, state, frozen
        except Exception as e:  # noqa: BLE001
            print(f"profile train {remat}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="forward,ttft,train")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hlo-dir", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--remat", default="nothing_saveable,dots_with_no_batch_dims_saveable",
                   help="train: the remat policies to profile (comma list)")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"# gpu_profile  date {datetime.datetime.now().isoformat(timespec='seconds')}  device {dev.device_kind} "
          f"({dev.platform})  jax {jax.__version__}", flush=True)
    for what in args.what.split(","):
        {"forward": forward, "ttft": ttft, "train": train}[what](args)


if __name__ == "__main__":
    main()
