"""benchmarks/device_profile.py, the profile reader the GPU runs rely on, on a CPU trace."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from device_profile import category, profile_calls, report  # noqa: E402


def test_profile_calls_counts_the_xla_ops_of_each_call():
    f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
    x = jnp.ones((384, 384))

    def run():
        jax.block_until_ready(f(x))
    run()
    summary = profile_calls(run, calls=3, label="test", print_report=False)
    assert summary["calls"] == 3 and summary["wall_s"] > 0 and not summary["device"]
    assert summary["ops"], "no XLA op found in the trace"
    assert summary["busy_ns"] == sum(ns for ns, _, _ in summary["ops"].values()) > 0
    # every op ran once per call: 3 calls, each op 3 times
    assert all(count % 3 == 0 for _, count, _ in summary["ops"].values())
    text = report(summary, summary["wall_s"], top=5, label="test")
    assert text.startswith("# profile test: wall") and "category" in text


def test_categories():
    assert category("custom-call.3", "sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert category("custom-call.12", "cudnn_generated_fort_native_sdpa") == "attention"
    assert category("fusion.3", "loop_multiply_fusion") == "elementwise fusion"
    assert category("input_reduce_fusion", "input_reduce_fusion") == "reduction fusion"
    assert category("copy.4", "copy") == "copy"
    assert category("loop_convert_fusion.2", "loop_convert_fusion") == "convert fusion"
