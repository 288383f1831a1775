"""benchmarks/device_profile.py, the profile reader the GPU runs rely on, on a CPU trace."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from device_profile import category, cublas_summary, profile_calls, report  # noqa: E402


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


def test_dot_forms_and_flops():
    from device_profile import _dot
    shapes = {"x": (64, 32), "w": (32, 48), "wt": (48, 32), "xt": (32, 64), "q": (4, 8, 128, 32),
              "kt": (4, 8, 32, 128)}
    for operands, lc, rc, form in ((("x", "w"), 1, 0, "NN"), (("x", "wt"), 1, 1, "NT"), (("xt", "w"), 0, 0, "TN"),
                                   (("xt", "wt"), 0, 1, "TT")):
        attrs = f", lhs_contracting_dims={{{lc}}}, rhs_contracting_dims={{{rc}}}"
        assert _dot(shapes, (64, 48), list(operands), attrs, cublas=False) == (2.0 * 64 * 32 * 48, form)
    attrs = ", lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}"
    assert _dot(shapes, (4, 8, 128, 128), ["q", "kt"], attrs, cublas=False) == (2.0 * 4 * 8 * 128 * 128 * 32, "NN")
    cublas = ('backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
              '"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}')
    assert _dot(shapes, (64, 48), ["x", "wt"], cublas, cublas=True) == (2.0 * 64 * 32 * 48, "NT")


def test_hlo_report_counts_every_matmul_flop_and_the_phases():
    from device_profile import hlo_ops, hlo_report
    x, w = jnp.ones((96, 64)), jnp.ones((64, 128))

    def loss(x, w):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T))  # no constant cotangent for XLA to fold
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = f.lower(x, w).compile()

    def run():
        jax.block_until_ready(compiled(x, w))
    run()
    summary = profile_calls(run, calls=2, print_report=False)
    info = hlo_ops(compiled.as_text())
    # forward: x @ w and h @ w.T; backward: two products per forward product
    expected = 6 * 2.0 * 96 * 64 * 128
    profiled = sum(info[op]["flops"] for op in summary["ops"] if op in info)
    assert profiled == expected
    text = hlo_report(summary, compiled.as_text(), label="t")
    assert f"{expected / 1e9:.3f} GFLOP/call" in text
    phases = {info[op]["phase"] for op in summary["ops"] if op in info}
    assert {"forward", "backward"} <= phases


def test_cublas_summary_counts_outputs_and_epilogues():
    """Read from lines of an optimized GPU program (the fourth H200 run's forward, shortened): result type of each
    cuBLAS-Lt call and its fused epilogue; other custom calls are not counted."""
    hlo = "\n".join([
        '  %custom-call.34 = (f32[8192,2560]{1,0}, s8[33554432]{0}) custom-call(%bitcast.549.0, %w.1), '
        'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"epilogue":"DEFAULT"}}',
        '  %custom-call.35 = (bf16[8192,10240]{1,0}, s8[33554432]{0}) custom-call(%b.1, %w.2, %bias.3), '
        'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"epilogue":"BIAS"}}',
        '  %custom-call.36 = (bf16[8192,2560]{1,0}, s8[33554432]{0}) custom-call(%b.2, %w.3), '
        'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"epilogue":"DEFAULT"}}',
        '  %custom-call.1 = (bf16[4,2048,32,80]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), '
        'custom_call_target="__cudnn$fmhaSoftmax"',
    ])
    line = cublas_summary(hlo, "fwd")
    assert line == "profile fwd cuBLAS-Lt matmuls 3: outputs bf16 2, f32 1; epilogues DEFAULT 2, BIAS 1", line
    assert cublas_summary("", "x").endswith("matmuls 0: outputs -; epilogues -")
