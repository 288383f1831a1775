"""GPU check of `attn_implementation` (cudnn, pallas, auto) against xla on the model: logits at real positions,
a fully padded row stays finite, and gradients are finite and close. Prints PASS/FAIL lines; < 1 minute.

    python benchmarks/gpu_attn_impls.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi_jax
from phi_jax.config import phi_2
from phi_jax.modeling import attention


def main() -> None:
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}; CUDA kernel: {attention.flash_attention_gpu.__module__}")
    cfg = phi_2(num_hidden_layers=2, vocab_size=1024, bos_token_id=None, eos_token_id=None)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (3, 256)), jnp.int32)
    mask = np.ones((3, 256), np.int32)
    mask[0, :40] = 0  # left padding
    mask[1, 200:] = 0  # right padding
    mask[2, 128:] = 2  # two packed documents
    mask = jnp.asarray(mask)
    real = np.asarray(mask) != 0
    base = phi_jax.PhiForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _, params, rest = nnx.split(base, nnx.Param, ...)

    def run(impl, ids, mask):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: phi_jax.PhiForCausalLM(
            cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_implementation=impl, rngs=nnx.Rngs(0))))

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(ids, mask).logits
            return jnp.sum(jnp.where(mask[..., None] != 0, logits, 0.0)) / 1e4, logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits, np.float32), grads

    ref, ref_grads = run("xla", ids, mask)
    ok_all = True
    for impl in ("cudnn", "pallas", "auto"):
        try:
            out, grads = run(impl, ids, mask)
            err = float(np.max(np.abs(out[real] - ref[real])) / np.std(ref[real]))
            gerr = max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / (jnp.linalg.norm(b.astype(jnp.float32)) + 1e-12))
                       for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
            finite = bool(np.isfinite(out).all()) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
            ok = finite and err <= 5e-2 and gerr <= 5e-2
            ok_all &= ok
            print(f"{'PASS' if ok else 'FAIL'} {impl}: logits max|d|/std {err:.2e}, grads worst rel {gerr:.2e}, "
                  f"finite {finite}")
        except Exception as e:
            ok_all = False
            print(f"FAIL {impl}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print("ALL PASS" if ok_all else "SOME FAILED")


if __name__ == "__main__":
    main()
