"""What every benchmark prints first: date, machine, versions, and the thread count both libraries ran with.

`pin_threads(n)` must run before jax or torch is imported: it restricts the process to `n` CPU cores (XLA's
CPU thread pool sizes itself from the cores the process may use) and sets torch's thread count to `n`, so
phi_jax and transformers get the same number of threads.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import socket
import sys
import time


def pin_threads(n: int | None) -> int:
    """Restricts this process (and its children) to the first `n` usable CPU cores; returns the core count in use."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if n:
        if n > len(cores):
            raise SystemExit(f"--threads {n}: only {len(cores)} cores are available")
        cores = cores[:n]
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(n)
    return len(cores)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(threads: int) -> list[str]:
    """Lines describing this run; call after jax (and torch, if used) are imported."""
    import jax
    versions = [f"python {platform.python_version()}"]
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "orbax.checkpoint", "safetensors"):
        if name in sys.modules or name in ("jax", "jaxlib", "flax", "numpy"):
            try:
                versions.append(f"{name} {importlib.import_module(name).__version__}")
            except (ImportError, AttributeError):
                pass
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
             f"machine: {socket.gethostname()}, {_cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
             f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))",
             "versions: " + ", ".join(versions)]
    thread_line = f"threads: {threads} CPU cores for XLA (process affinity)"
    if "torch" in sys.modules:
        import torch
        thread_line += f"; torch intra-op threads {torch.get_num_threads()}"
    lines.append(thread_line)
    return lines


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` (which must block until its result is ready)."""
    from phi_jax.parity import median_seconds
    return median_seconds(fn, repeats)


def interleaved(fns: dict, rounds: int, *, calls: int = 1, stat=None) -> dict[str, float]:
    """Seconds per call of each of `fns` (blocking callables): each is warmed up once, then every round times
    `calls` calls of one after another, so that load drifting on a shared host hits all of them alike. `stat`
    (the median by default) over the rounds."""
    import numpy as np
    stat = stat or np.median
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: float(stat(ts)) for name, ts in times.items()}


@contextlib.contextmanager
def patched(obj, name: str, value):
    """`obj.name = value` inside the block, restored after: programs traced inside see the patched function (an
    ablation or the library's older form, for an A/B)."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)
