"""Where a compiled program's device time goes: a JAX profiler trace of a few calls, summed per XLA op.

`profile_calls(run, calls=3)` traces `calls` calls of `run` (a zero-argument function that blocks until its result
is ready; warm it up first), reads the trace back with `jax.profiler.ProfileData` (no TensorBoard or xprof needed)
and prints, per call: wall time, device busy time (the sum of kernel times), the time per category (matmul,
attention, elementwise fusion, reduction, convert, copy, ...) and the `top` XLA ops by time with their kernel names. On a
GPU the kernels of the device planes' stream lines are counted; without a device plane (the CPU) the XLA ops that
the host threads ran.

    from device_profile import profile_calls
    summary = profile_calls(lambda: jax.block_until_ready(step(x)), calls=3, label="train step")

`hlo_report(summary, compiled.as_text())` reads the optimized HLO of the same program beside the trace: each matmul
op's FLOPs (the dots it holds), so its achieved GFLOP/s, grouped by operand form (NN: `x @ w`; NT: `g @ w.T`; TN:
`x.T @ g`, the weight gradients), and the time of every op split by phase (forward, backward, the rest: optimizer
and loss bookkeeping), read from the ops' `op_name` metadata.
"""

from __future__ import annotations

import collections
import glob
import math
import os
import re
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


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(  # name = shape (an array's dims, or a tuple) opcode(operands), attributes
    r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(?:\w+\[([\d,]*)\]\S*|\([^()]*\))\s+([\w\-]+)\((.*?)\)(.*)$")


def _dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _json_dims(attrs: str, key: str) -> tuple[int, ...]:  # a cuBLAS custom call's backend_config
    m = re.search(r'"' + key + r'":\[([^\]]*)\]', attrs)
    return tuple(int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')) if m else ()


def _dot(shapes: dict, out, operands: list[str], attrs: str, cublas: bool) -> tuple[float, str] | None:
    """(FLOPs, form) of one dot instruction; None when an operand's shape is unknown."""
    if len(operands) < 2 or operands[0] not in shapes or operands[1] not in shapes:
        return None
    lhs, rhs = shapes[operands[0]], shapes[operands[1]]
    if cublas:
        lc, rc = _json_dims(attrs, "lhs_contracting_dimensions"), _json_dims(attrs, "rhs_contracting_dimensions")
        lb, rb = _json_dims(attrs, "lhs_batch_dimensions"), _json_dims(attrs, "rhs_batch_dimensions")
    else:
        lc, rc = _dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims")
        lb, rb = _dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims")
    flops = 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)
    lhs_free = [d for d in range(len(lhs)) if d not in lc and d not in lb]
    rhs_free = [d for d in range(len(rhs)) if d not in rc and d not in rb]
    # N: contracting after the free dims on the left, before them on the right (row-major x @ w)
    form = ("N" if not lhs_free or min(lc, default=0) > max(lhs_free) else "T") + \
           ("N" if not rhs_free or max(rc, default=0) < min(rhs_free) else "T")
    return flops, form


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """{op name: {"flops", "forms", "phase"}} for the instructions of an optimized HLO module's computations; a
    fusion or call counts the dots of the computations it calls, a cuBLAS custom call its GEMM."""
    computations: dict[str, list] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = computations.setdefault(m.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            name, dims, opcode, operands, attrs = m.groups()
            current.append((name, tuple(int(d) for d in (dims or "").split(",") if d), opcode,
                            re.findall(r"%([\w.\-]+)", operands), attrs))
    own: dict[str, tuple[float, dict]] = {}  # computation -> (dot FLOPs, {form: FLOPs}) of its own instructions

    def dots_of(comp: str, seen=()) -> tuple[float, dict]:
        if comp in own:
            return own[comp]
        shapes = {name: dims for name, dims, *_ in computations.get(comp, [])}
        total, forms = 0.0, collections.Counter()
        for name, dims, opcode, operands, attrs in computations.get(comp, []):
            f, fm = _instruction_flops(shapes, dims, opcode, operands, attrs, seen + (comp,))
            total += f
            forms.update(fm)
        own[comp] = (total, dict(forms))
        return own[comp]

    def _instruction_flops(shapes, dims, opcode, operands, attrs, seen):
        if opcode == "dot" or (opcode == "custom-call" and "gemm" in attrs.split("backend_config")[0].lower()):
            r = _dot(shapes, dims, operands, attrs, cublas=opcode != "dot")
            return (r[0], {r[1]: r[0]}) if r else (0.0, {})
        called = re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", attrs)
        total, forms = 0.0, collections.Counter()
        for c in called:
            if c not in seen:
                f, fm = dots_of(c, seen)
                total += f
                forms.update(fm)
        return total, dict(forms)

    ops = {}
    for comp, instructions in computations.items():
        shapes = {name: dims for name, dims, *_ in instructions}
        for name, dims, opcode, operands, attrs in instructions:
            flops, forms = _instruction_flops(shapes, dims, opcode, operands, attrs, (comp,))
            m = re.search(r'op_name="([^"]*)"', attrs)
            op_name = m.group(1) if m else ""
            phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"
            ops[name] = {"flops": flops, "forms": forms, "phase": phase}
    return ops


def hlo_report(summary: dict, hlo_text: str, *, top: int = 12, label: str = "") -> str:
    """Matmul GFLOP/s per operand form and per op, and op time per phase, from a profile and its program's HLO."""
    calls, info = summary["calls"], hlo_ops(hlo_text)
    phases: dict[str, float] = collections.defaultdict(float)
    by_category: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    forms: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0])  # form -> [ns, FLOPs, ops]
    rows = []
    for op, (ns, _, kernel) in summary["ops"].items():
        rec = info.get(op)
        phase = rec["phase"] if rec else "(not in the HLO)"
        phases[phase] += ns
        by_category[phase][category(op, kernel)] += ns
        if rec is None:
            continue
        if rec["flops"]:
            form = "+".join(sorted(rec["forms"]))
            f = forms[form]
            f[0], f[1], f[2] = f[0] + ns, f[1] + rec["flops"] * calls, f[2] + 1
            rows.append((ns, op, form, rec["flops"] * calls))
    out = []
    for name, ns in sorted(phases.items(), key=lambda kv: -kv[1]):
        split = ", ".join(f"{c} {v / 1e6 / calls:.1f}" for c, v in by_category[name].most_common())
        out.append(f"profile {label} phase {name:<18} {ns / 1e6 / calls:9.3f} ms/call "
                   f"{100 * ns / max(summary['busy_ns'], 1):5.1f}%  ({split})")
    ns_all = sum(f[0] for f in forms.values())
    flops_all = sum(f[1] for f in forms.values())
    out.append(f"profile {label} matmuls {sum(f[2] for f in forms.values())} ops, {flops_all / calls / 1e9:.3f} "
               f"GFLOP/call in {ns_all / 1e6 / calls:.3f} ms/call: {flops_all / max(ns_all, 1):.1f} GFLOP/s")
    for form, (ns, flops, n) in sorted(forms.items(), key=lambda kv: -kv[1][0]):
        out.append(f"profile {label} matmul form {form:<6} {n:4d} ops {flops / calls / 1e9:8.3f} GFLOP/call "
                   f"{ns / 1e6 / calls:9.3f} ms/call {flops / max(ns, 1):8.1f} GFLOP/s")
    for ns, op, form, flops in sorted(rows, reverse=True)[:top]:
        out.append(f"profile {label} matmul op {ns / 1e6 / calls:9.3f} ms/call {form:<6} {flops / max(ns, 1):8.1f} "
                   f"GFLOP/s  {op[:60]}")
    return "\n".join(out)


_CUBLAS = re.compile(r'= \(?(\w+)\[[^\]]*\][^=]*custom-call\(([^)]*)\), custom_call_target="__cublas\$lt\$matmul"')


def cublas_summary(hlo_text: str, label: str = "") -> str:
    """One line on an optimized GPU program's cuBLAS-Lt matmuls: how many, by output type, and which epilogues
    XLA fused into them (DEFAULT: none; BIAS, GELU, ...), read from each call's result type and backend config."""
    outputs, epilogues = collections.Counter(), collections.Counter()
    for line in hlo_text.splitlines():
        m = _CUBLAS.search(line)
        if not m:
            continue
        outputs[m.group(1)] += 1
        e = re.search(r'"epilogue":"(\w+)"', line)
        epilogues[e.group(1) if e else "?"] += 1
    n = sum(outputs.values())
    by = lambda c: ", ".join(f"{k} {v}" for k, v in c.most_common())  # noqa: E731
    return f"profile {label} cuBLAS-Lt matmuls {n}: outputs {by(outputs) or '-'}; epilogues {by(epilogues) or '-'}"
