"""The Linear projections' result type (`phi_jax.modeling.matmul.projection_result_type`).

16-bit compute: every q/k/v/dense/fc1/fc2 product is rounded once to the compute dtype in the product (as torch's
bf16 Linear writes it), so it writes, and a remat policy saves, 16-bit values; the LM head keeps float32 logits.
float32 compute: every product is float32, as before.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # not public in jax 0.10/0.11 (print_saved_residuals is)

import phi_jax
from phi_jax.modeling.matmul import projection_result_type

HIDDEN, INTER, VOCAB, LAYERS = 128, 512, 256, 2


def _model(dtype, **kw):
    cfg = phi_jax.phi_2(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    return phi_jax.PhiForCausalLM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _dot_results(jaxpr) -> collections.Counter:
    """(operand dtype, result dtype, result's last size) of every dot_general, nested programs included."""
    found = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out = eqn.outvars[0].aval
            found[str(eqn.invars[0].aval.dtype), str(out.dtype), out.shape[-1]] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):  # as test_train_step's _kernel_calls
            found += _dot_results(sub)
    return found


def test_result_type_per_compute_dtype():
    assert projection_result_type(jnp.float32) == jnp.float32
    assert projection_result_type(jnp.bfloat16) is None and projection_result_type(jnp.float16) is None


def test_bf16_projections_round_in_the_product_and_logits_stay_float32():
    ids = jnp.ones((2, 16), jnp.int32)
    for dtype, kind in ((jnp.bfloat16, "bfloat16"), (jnp.float32, "float32")):
        model = _model(dtype)
        dots = _dot_results(jax.make_jaxpr(lambda ids: model(ids).logits)(ids).jaxpr)
        # q, k, v, dense, fc2 ([.., 128]) and fc1 ([.., 512]) in every layer: results in the compute dtype
        assert dots[kind, kind, HIDDEN] >= 5 * LAYERS, dots
        assert dots[kind, kind, INTER] == LAYERS, dots
        assert dots[kind, "float32", VOCAB] == 1, dots  # the LM head: float32 logits either way
        if kind == "bfloat16":
            assert dots[kind, "float32", HIDDEN] == 0 and dots[kind, "float32", INTER] == 0, dots


def test_remat_saves_bf16_projection_outputs():
    """Under `dots_with_no_batch_dims_saveable` the saved projection outputs are bf16 (half the bytes of the
    float32 results saved before 2026-11-27, which were most of the phi-2 train step's 48 GiB of temporaries)."""
    model = _model(jnp.bfloat16)
    model.model.remat_policy = "dots_with_no_batch_dims_saveable"
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.ones((2, 16), jnp.int32)
    saved = saved_residuals(lambda p: nnx.merge(graphdef, p, rest)(ids, labels=ids).loss, params)
    # the projections run over rows (`projection.over_rows`): their outputs are [B * T, F]
    dots = [aval for aval, why in saved if "dot_general" in why and aval.shape[0] == ids.size and aval.ndim == 2]
    fc1 = [aval for aval in dots if aval.shape[-1] == INTER]
    assert fc1 and all(aval.dtype == jnp.bfloat16 for aval in fc1), saved
    assert not [aval for aval in dots if aval.dtype == jnp.float32], saved


def test_bf16_logits_follow_the_float32_model():
    """The bf16 model (16-bit projection results) against the float32 model on the same weights: the top-1 token
    agrees and the logits are within bf16's error (the float32 path is unchanged; transformers' parity tests
    cover it)."""
    ids = jax.random.randint(jax.random.key(0), (4, 32), 0, VOCAB)
    ref = np.asarray(_model(jnp.float32)(ids).logits)
    out = np.asarray(_model(jnp.bfloat16)(ids).logits)
    err = np.max(np.abs(out - ref)) / np.std(ref)
    assert 1e-4 < err <= 3e-2, err  # above 1e-4: bf16 arithmetic really ran
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_lora_on_a_bf16_model_starts_from_it_and_merges_back():
    """LoRA adapters (float32 parameters, zero B) on a bf16 model with 16-bit projection results: the logits start
    equal to the base model's, every B gets a gradient, and an adapter after one step, merged into the kernels,
    gives the adapted model's logits to bf16's precision."""
    from phi_jax.train.lora import add_lora, merge_lora
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, VOCAB)
    base = np.asarray(_model(jnp.bfloat16)(ids).logits)
    model = add_lora(_model(jnp.bfloat16), 4)
    np.testing.assert_array_equal(np.asarray(model(ids).logits), base)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids, labels=ids).loss)(lora)
    assert all(bool(jnp.any(g != 0)) for path, g in jax.tree_util.tree_leaves_with_path(grads)
               if "lora_b" in jax.tree_util.keystr(path))
    lora = jax.tree.map(lambda p, g: p - 0.5 * g / (jnp.max(jnp.abs(g)) + 1e-12), lora, grads)  # a visible step
    nnx.update(model, lora)
    adapted = np.asarray(model(ids).logits)
    moved = np.max(np.abs(adapted - base))
    assert moved > 1.0  # the step moved the logits (measured 6.6)
    merged = np.asarray(merge_lora(model)(ids).logits)
    # the merged kernels are rounded to bf16 with the update in them: measured 0.038 (0.024 with float32 projection
    # results), 0.6% of what the adapters moved; a wrong scale or a lost adapter would be of the order of `moved`
    err = np.max(np.abs(merged - adapted))
    assert err <= 0.02 * moved and err / np.std(adapted) <= 5e-2, (err, moved)


def test_bf16_bias_gradients_sum_in_float32():
    """Every projection's bias gradient is a sum over all the batch's tokens: 16384 cotangents of exactly 1 through
    each of a bf16 layer's six projections give exactly 16384 (a bf16 sum gave 8192 on this CPU: at 8192 adding 1
    is lost), the LoRA form's too; the forward is the plain bf16 add."""
    from phi_jax.modeling.projection import project
    from phi_jax.train.lora import add_lora
    model = _model(jnp.bfloat16)
    layer = model.model.layers[0]
    linears = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
               "dense": layer.self_attn.dense, "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
    for name, linear in linears.items():
        x = jnp.zeros((16384, linear.in_features), jnp.bfloat16)
        graphdef, params = nnx.split(linear, nnx.Param)
        y = project(nnx.merge(graphdef, params), x)
        assert y.dtype == jnp.bfloat16 and bool(jnp.all(y == linear.bias[...].astype(jnp.bfloat16))), name
        grads = jax.jit(jax.grad(lambda p: jnp.sum(project(nnx.merge(graphdef, p), x).astype(jnp.float32))))(params)
        np.testing.assert_array_equal(np.asarray(grads["bias"][...]), 16384.0, err_msg=name)
    # LoRA: the base bias is frozen, but the same forward (bias through add_bias) runs in the adapted layer
    lora = add_lora(_model(jnp.bfloat16), 2).model.layers[0].mlp.fc1
    x = jnp.zeros((16384, lora.in_features), jnp.bfloat16)
    graphdef, params, rest = nnx.split(lora, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x).astype(jnp.float32))))(params)
    np.testing.assert_array_equal(np.asarray(grads["bias"][...]), 16384.0)


def test_bf16_bias_gradients_follow_the_float32_model():
    """Through the whole bf16 model (4 x 512 tokens, float32 master weights), every bias gradient against the
    float32 model's: measured at most 0.015 relative (k_proj's, whose true gradient nearly cancels), median 0.0048;
    with the bf16 sum over the tokens, 0.035 and 0.0092."""
    ids = jax.random.randint(jax.random.key(2), (4, 512), 0, VOCAB)

    def bias_grads(dtype):
        graphdef, params, rest = nnx.split(_model(dtype), nnx.Param, ...)
        grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids, labels=ids).loss))(params)
        return {jax.tree_util.keystr(k): np.asarray(g) for k, g in jax.tree_util.tree_leaves_with_path(grads)
                if "bias" in jax.tree_util.keystr(k)}
    out, ref = bias_grads(jnp.bfloat16), bias_grads(jnp.float32)
    errs = {k: np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k]) for k in ref}
    assert len(errs) == 7 * LAYERS + 2  # per layer six projections and the layer norm; the final norm, the LM head
    assert max(errs.values()) <= 0.022 and np.median(list(errs.values())) <= 0.007, errs
