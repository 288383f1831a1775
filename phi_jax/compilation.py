"""Counting XLA compilations, to check what recompiles (tests, CLI, benchmarks)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax


@dataclasses.dataclass
class Compilations:
    """What `count_compilations` saw: XLA backend compilations and the seconds spent tracing, lowering and
    compiling."""

    count: int = 0
    seconds: float = 0.0


_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
    """Counts the XLA compilations (of any jitted function) inside the `with` block, and their time."""
    seen = Compilations()

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            seen.seconds += duration
            seen.count += event == _COMPILE_EVENTS[0]

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
