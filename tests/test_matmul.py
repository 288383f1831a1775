"""phi_jax.modeling.matmul.dot_general: the forward is lax.dot_general; 16-bit operands with a float32 result
take 16-bit gradient products (no float32 x float32 product on upcast copies in a bf16 train step)."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi_jax
from phi_jax.modeling.matmul import dot_general

DIMS = (((1,), (0,)), ((), ()))


def _operands(dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (32, 48), jnp.float32).astype(dtype)
    w = jax.random.normal(k2, (48, 24), jnp.float32).astype(dtype)
    g = jax.random.normal(k3, (32, 24), jnp.float32)
    return x, w, g


def _dot_operand_dtypes(text: str) -> collections.Counter:
    dots = re.findall(r"stablehlo.dot_general .*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", text)
    return collections.Counter(dots)


def test_float32_is_lax_dot_general_both_ways():
    x, w, g = _operands(jnp.float32)
    for pet in (None, jnp.float32):
        ours = jax.vjp(lambda a, b: dot_general(a, b, DIMS, preferred_element_type=pet), x, w)
        ref = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, DIMS, preferred_element_type=pet), x, w)
        np.testing.assert_array_equal(ours[0], ref[0])
        for a, b in zip(ours[1](g), ref[1](g)):
            np.testing.assert_array_equal(a, b)


def test_bf16_forward_unchanged_backward_in_bf16():
    x, w, g = _operands(jnp.bfloat16)

    def ours(a, b):
        return dot_general(a, b, DIMS, preferred_element_type=jnp.float32)

    def ref(a, b):
        return jax.lax.dot_general(a, b, DIMS, preferred_element_type=jnp.float32)

    out, vjp = jax.vjp(ours, x, w)
    out_ref, vjp_ref = jax.vjp(ref, x, w)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, out_ref)
    for a, b in zip(vjp(g), vjp_ref(g)):  # the cotangent rounded to bf16 first: bf16-level agreement
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))
    text = jax.jit(lambda a, b, g: jax.vjp(ours, a, b)[1](g)).lower(x, w, g).as_text()
    assert set(_dot_operand_dtypes(text)) == {("bf16", "bf16")}
    # the plain form multiplies float32 x float32 in its backward (what this module avoids)
    text_ref = jax.jit(lambda a, b, g: jax.vjp(ref, a, b)[1](g)).lower(x, w, g).as_text()
    assert ("f32", "f32") in _dot_operand_dtypes(text_ref)


def test_bf16_model_gradient_has_only_bf16_products():
    """Every matrix product of a bf16 Phi's loss gradient (projections, MLP, LM head, xla attention) is
    bf16 x bf16; the float32 model's are float32."""
    ids = jnp.ones((2, 16), jnp.int32)
    for dtype, kind in ((jnp.bfloat16, "bf16"), (jnp.float32, "f32")):
        for tie in (True, False):
            cfg = phi_jax.phi_2(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                tie_word_embeddings=tie)
            graphdef, params, rest = nnx.split(
                phi_jax.PhiForCausalLM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), nnx.Param, ...)

            def loss(params):
                return nnx.merge(graphdef, params, rest)(ids, labels=ids).loss
            text = jax.jit(jax.grad(loss)).lower(params).as_text()
            dtypes = _dot_operand_dtypes(text)
            assert set(dtypes) == {(kind, kind)}, (kind, tie, dtypes)


def test_bf16_model_gradient_close_to_float32():
    """The bf16 model's gradient (16-bit gradient products) against the float32 model's on the same weights:
    measured worst leaf max|d|/max|ref| 1.25e-2, cosine 0.99998 (JAX's own rule: 1.18e-2, 0.99998)."""
    cfg = phi_jax.phi_2(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=8, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    ids = jax.random.randint(jax.random.key(1), (4, 64), 0, 512)

    def grads(dtype):
        graphdef, params, rest = nnx.split(
            phi_jax.PhiForCausalLM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), nnx.Param, ...)
        return jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids, labels=ids).loss))(params)

    ours, ref = jax.tree.leaves(grads(jnp.bfloat16)), jax.tree.leaves(grads(jnp.float32))
    worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(ours, ref))
    va, vb = (jnp.concatenate([x.ravel() for x in leaves]) for leaves in (ours, ref))
    cosine = float(va @ vb / jnp.linalg.norm(va) / jnp.linalg.norm(vb))
    assert worst <= 3e-2 and cosine >= 0.9999, (worst, cosine)


def test_remat_policies_see_the_product_and_frozen_operands_cost_nothing():
    """Under `dots_with_no_batch_dims_saveable` the forward products are saved, not recomputed (a custom VJP would
    hide them from the policy: 6 products instead of 5), and a gradient that needs only the second layer's weight
    computes no product for the first layer's frozen operands: the same product counts as lax.dot_general."""
    x, w1, _ = _operands(jnp.bfloat16)
    w2 = jax.random.normal(jax.random.key(5), (24, 16), jnp.float32).astype(jnp.bfloat16)

    def counts(dg, policy, argnums):
        def layer(x, w1, w2):
            h = jnp.tanh(dg(x, w1, DIMS, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
            return dg(h, w2, DIMS, preferred_element_type=jnp.float32)
        f = layer if policy is None else jax.checkpoint(layer, policy=getattr(jax.checkpoint_policies, policy))
        text = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a)), argnums=argnums)).lower(x, w1, w2).as_text()
        return _dot_operand_dtypes(text)

    for policy, argnums in (("nothing_saveable", (1, 2)), ("dots_with_no_batch_dims_saveable", (1, 2)),
                            (None, (2,)), (None, (0,))):
        ours, ref = counts(dot_general, policy, argnums), counts(jax.lax.dot_general, policy, argnums)
        assert sum(ours.values()) == sum(ref.values()), (policy, argnums, ours, ref)
        assert set(ours) == {("bf16", "bf16")}
