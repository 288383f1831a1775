#!/usr/bin/env bash
# Every GPU check and timing of the open issues in one run on a lent H100/H200 (see benchmarks/RESULTS.md),
# what the last run left unmeasured first.
# Each step gets a time limit cut to what is left of DEADLINE seconds, so that a slow or hanging step costs its
# own figures only. OUTDIR (default: $OUT on the device machine, else ./gpu_out) gets summary.txt (also printed)
# and logs.tgz, every step's whole log (and the profiled programs' HLO), refreshed after each step: the device
# tool brings back at most 8 files.
#
#   bash benchmarks/gpu_all.sh [DEADLINE]        # from the repository root; < 10 minutes
#   ONLY="profile_train train" bash benchmarks/gpu_all.sh 240   # only these steps (a second call on the warm machine)
#
# tokamax (optional, compared in benchmarks/attention.py) is installed from .whl/ when that folder holds its
# wheels (see the device notes: pip download --python-version 3.12 ... tokamax==0.0.17 and its needs).
set -u
DEADLINE=${1:-560}
OUTDIR=${OUT:-gpu_out}
LOGDIR=$(mktemp -d /tmp/gpu_logs.XXXX)
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
# programs compiled by one step (the train step, the kernels) are reused by a later step that builds the same one
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
START=$(date +%s)

# the lines of each step's log that summary.txt keeps
KEEP="PASS|FAIL|speed-up|ratios|MFU|largest|fits|floor|transformers|TFLOP|[Ee]rror|category|phase|form|cuBLAS|/ default"

step() {  # step NAME LIMIT COMMAND...: run COMMAND with min(LIMIT, time left) seconds, its log into logs.tgz
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local left=$((DEADLINE - ($(date +%s) - START) - 5))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (out of time)" | tee -a "$OUTDIR/summary.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$LOGDIR/$name.txt" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $(($(date +%s) - t0)) s (limit $limit s): $*" | tee -a "$OUTDIR/summary.txt"
    grep -E "$KEEP" "$LOGDIR/$name.txt" | head -80 >> "$OUTDIR/summary.txt"
    tar -czf "$OUTDIR/logs.tgz" -C "$LOGDIR" .
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUTDIR/summary.txt" 2>&1

if ls .whl/tokamax-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >> "$OUTDIR/summary.txt" 2>&1
fi

# Priorities after the fifth run (benchmarks/RESULTS.md): the GPU check that failed there (cudnn/pallas/auto against
# xla, with the bias gradients now summed in float32), then the goals' figures the fifth run did not reach.
# issue 10: the model's attention implementations agree with xla on the GPU, gradients included (pytest's version of
# this failed in the fifth run, presumably on the k_proj bias gradients summed in bf16; fixed after it)
step impls 90 python3 benchmarks/gpu_attn_impls.py
# issue 10: the phi-2 forward b4x2048 against transformers (goal >= 1.5x), transformers timed first
step forward 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 benchmarks/attention.py --skip-kernels --budget 0.3
# issue 12: MFU at batch 8, then the largest batch that fits (estimated about 20 in the fifth run) and its MFU
step train 240 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/train.py --gpu --remat \
    dots_and_attention_saveable --batch 8 --find-max --repeats 3
# issue 12: no rematerialisation at all (everything_saveable keeps every activation: with the bf16 projection results
# batch 8 may fit, and the backward then reruns no layer norm, GELU or residual) against the policy above
step train_policy 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/train.py --gpu --batch 8 \
    --remat dots_and_attention_saveable,everything_saveable
# issue 12: the projections on [B, T, D] operands (the form before 2026-11-27; rows are the default since) at the
# `train` step's batch and policy: rows made the CPU step 1.2-1.3x faster; check the GPU did not lose
step train_3d 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/train.py --gpu --batch 8 \
    --remat dots_and_attention_saveable --products 3d --repeats 3
# issue 10: numerics of the default kernel forms (the backward split and paired by default since the fifth run), then
# head_dim 80 fwd and fwd+bwd of every form (the two-warpgroup 3-slot forward matched cuDNN once: confirm it)
step variants 150 python3 benchmarks/gpu_attention.py --variants --check-only default --dims 80 --repeats 3
# issue 10: the decode kernel's device time per layer (12 layers in one program: with 32 the fifth run printed
# nothing within 70 s) against the KV-cache read floor
step decode_kernel 90 python3 benchmarks/gpu_attention.py --decode --skip-check --skip-table --repeats 3 \
    --layers 12
# issue 10: the tests that need a GPU (the model's cudnn/pallas/auto against xla first, then the kernels)
step pytest 120 env JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -p no:cacheprovider tests/test_attn_implementations.py \
    tests/test_kernels_gpu.py tests/test_decode_attention_gpu.py -k "on_gpu or TestGpu"
# issue 11: time to first token and decode through the public API, both libraries on the GPU
step generate 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 benchmarks/generate.py --gpu --geometry phi2 \
    --layers 32 --dtype bfloat16 --batch 1 8 --new-tokens 32
# issues 10-11: where the phi-2 forward b4x2048 (cudnn, pallas) and time to first token b1/b8 spend device time
step profile 110 python3 benchmarks/gpu_profile.py --what forward,ttft --hlo-dir "$LOGDIR/hlo"
# issue 11: batch-1 decode without the duplicated row, against batch 2 and the weight-read floor (PASS, fifth run)
step decode 100 python3 benchmarks/gpu_decode.py --steps 30 --repeats 3
# issue 10: where the head_dim-80 forward's and backward's time goes, 16-wide tiles vs the 64 + 16 split
step ablate 120 python3 benchmarks/gpu_attention.py --ablate --skip-check --skip-table --dims 80 \
    --head-split 0,1 --repeats 3
# issue 12: where the train step's device time goes (categories, top ops, matmul TFLOP/s per form, time per phase)
step profile_train 200 python3 benchmarks/gpu_profile.py --what train --remat dots_and_attention_saveable \
    --hlo-dir "$LOGDIR/hlo"
# issue 10: kernels against cuDNN, torch SDPA, tokamax; phi-2 forward with each implementation vs transformers
step attention 200 env PYTHONPATH="/tmp/site:$PWD" XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 \
    benchmarks/attention.py --seqs 4096 --budget 0.1
echo "total $(($(date +%s) - START)) s" >> "$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
