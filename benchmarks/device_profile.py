"""Where a compiled program's device time goes: a JAX profiler trace of a few calls, summed per XLA op.

`profile_calls(run, calls=3)` traces `calls` calls of `run` (a zero-argument function that blocks until its result
is ready; warm it up first), reads the trace back with `jax.profiler.ProfileData` (no TensorBoard or xprof needed)
and prints, per call: wall time, device busy time (the sum of kernel times), the time per category (matmul,
attention, elementwise fusion, reduction, convert, copy, ...) and the `top` XLA ops by time with their kernel names. On a
GPU the kernels of the device planes' stream lines are counted; without a device plane (the CPU) the XLA ops that
the host threads ran.

    from device_profile import profile_calls
    summary = profile_calls(lambda: jax.block_until_ready(step(x)), calls=3, label="train step")
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
import time

import jax

CATEGORIES = (  # first match wins, on the lower-cased "op name + kernel name"
    ("attention", ("cudnn", "fmha", "flash", "mosaic", "attention", "mgpu")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "matmul", "dot", "wgmma", "ynn", "sm90_", "nvjet")),
    ("copy", ("memcpy", "memset", "copy", "transpose", "dynamic-update-slice", "dynamic_update_slice")),
    ("reduction fusion", ("reduce", "softmax")),
    ("convert fusion", ("convert",)),  # dtype casts (bf16 <-> float32), alone or with other elementwise work
    ("elementwise fusion", ("fusion", "loop_")),
    ("custom call", ("custom-call", "custom_call")),
)


def category(op: str, kernel: str) -> str:
    text = f"{op} {kernel}".lower()
    for name, needles in CATEGORIES:
        if any(n in text for n in needles):
            return name
    return "other"


def _stat(event, key):
    for name, value in event.stats:
        if name == key:
            return value
    return None


def _kernel_lines(data):
    """(lines to count, on a device plane?): a device plane's stream lines (kernels), else XLA ops on host threads."""
    device = [p for p in data.planes if p.name.startswith("/device:")]
    if device:
        lines = [line for p in device for line in p.lines if line.name.lower().startswith("stream")]
        if not lines:  # no stream lines: the per-op line
            lines = [line for p in device for line in p.lines if line.name == "XLA Ops"]
        return lines, True
    host = [p for p in data.planes if p.name.startswith("/host:CPU")]
    return [line for p in host for line in p.lines], False


def summarize(data, calls: int) -> dict:
    """{"ops": {op: [ns, count, kernel name]}, "busy_ns": ..., "device": bool} from a ProfileData."""
    lines, on_device = _kernel_lines(data)
    ops: dict[str, list] = collections.defaultdict(lambda: [0, 0, ""])
    busy = 0
    for line in lines:
        for ev in line.events:
            op = _stat(ev, "hlo_op")
            if op is None and not on_device:
                continue  # host-side bookkeeping, not an XLA op
            key = str(op if op is not None else ev.name)
            entry = ops[key]
            entry[0] += ev.duration_ns
            entry[1] += 1
            entry[2] = entry[2] or ev.name
            busy += ev.duration_ns
    return {"ops": dict(ops), "busy_ns": busy, "device": on_device, "calls": calls}


def report(summary: dict, wall_s: float, *, top: int = 25, label: str = "") -> str:
    calls = summary["calls"]
    busy_ms = summary["busy_ns"] / 1e6 / calls
    out = [f"# profile {label}: wall {1e3 * wall_s:.2f} ms/call, "
           f"{'device' if summary['device'] else 'host XLA-op'} busy {busy_ms:.2f} ms/call "
           f"({100 * busy_ms / max(1e3 * wall_s, 1e-9):.0f}% of wall; on the CPU threads overlap)"]
    cats: dict[str, float] = collections.defaultdict(float)
    for op, (ns, _, kernel) in summary["ops"].items():
        cats[category(op, kernel)] += ns
    for name, ns in sorted(cats.items(), key=lambda kv: -kv[1]):
        out.append(f"profile {label} category {name:<20} {ns / 1e6 / calls:9.3f} ms/call "
                   f"{100 * ns / max(summary['busy_ns'], 1):5.1f}%")
    ranked = sorted(summary["ops"].items(), key=lambda kv: -kv[1][0])
    for op, (ns, count, kernel) in ranked[:top]:
        out.append(f"profile {label} op {ns / 1e6 / calls:9.3f} ms/call {100 * ns / max(summary['busy_ns'], 1):5.1f}% "
                   f"x{count / calls:<5.0f} {category(op, kernel):<18} {op[:60]:<60} {kernel[:70]}")
    return "\n".join(out)


def profile_calls(run, *, calls: int = 3, top: int = 25, label: str = "", print_report: bool = True) -> dict:
    """Traces `calls` calls of `run` (blocking, already warm); prints and returns the summary (with "wall_s")."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            wall = (time.perf_counter() - t0) / calls
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"profile {label}: the profiler wrote no trace")
        data = jax.profiler.ProfileData.from_file(files[0])
        summary = summarize(data, calls)
    summary["wall_s"] = wall
    if print_report:
        print(report(summary, wall, top=top, label=label), flush=True)
    return summary
