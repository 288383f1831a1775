"""Bad input through the Python API (model calls, `compiled`, `generate`, `from_pretrained`, the training configs):
a clear error naming the culprit, never an obscure exception from deep inside JAX or a silent wrong result."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import phi_jax
from phi_jax.parity import random_checkpoint
from phi_jax.train.loop import RunConfig
from phi_jax.train.step import TrainConfig

GEOMETRY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                partial_rotary_factor=0.5, max_position_embeddings=64)
IDS = np.array([[4, 5, 6, 7], [8, 9, 10, 11]])


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("api_review"))
    random_checkpoint(d, **GEOMETRY)
    return d


@pytest.fixture(scope="module")
def model(path):
    return phi_jax.PhiForCausalLM.from_pretrained(path)


@pytest.fixture(params=["eager", "compiled"])
def call(request, model):
    return model if request.param == "eager" else phi_jax.compiled(model)


def test_zero_tokens_and_lists_are_named(call):
    """Before: a (2, 0) batch failed in a JAX reduction ("zero-size array to reduction operation max"); a list
    failed in `jnp.take` (eager) or under jit as a TracerArrayConversionError, and list masks as AttributeError."""
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\)"):
        call(np.zeros((2, 0), np.int32))
    with pytest.raises(TypeError, match="input_ids must be an array"):
        call([[1, 2, 3]])
    with pytest.raises(TypeError, match="attention_mask must be an array"):
        call(IDS, [[1] * 4] * 2)
    with pytest.raises(TypeError, match="position_ids must be an array"):
        call(IDS, None, [[0, 1, 2, 3]] * 2)


@pytest.mark.parametrize("value", [0.5, -1, np.nan])
def test_attention_mask_values_outside_its_meaning(call, value):
    """Before: 0.5 was read as padding (transformers reads it as a real token), -1 as a document of its own and NaN
    as whatever the cast gave, all silently."""
    mask = np.ones((2, 4), np.float32 if isinstance(value, float) else np.int32)
    mask[1, 2] = value
    with pytest.raises(ValueError, match=r"attention_mask holds .* at position \(1, 2\)"):
        call(IDS, mask)


def test_valid_masks_still_pass(call, model):
    want = np.asarray(model(IDS, np.array([[0, 1, 1, 1], [1, 1, 2, 2]])).logits)
    for mask in (np.array([[0, 1, 1, 1], [1, 1, 2, 2]], np.float32), np.array([[0, 1, 1, 1], [1, 1, 2, 2]])):
        np.testing.assert_allclose(np.asarray(call(IDS, mask).logits), want, rtol=1e-5, atol=1e-5)
    call(IDS, np.ones((2, 4), bool))


def test_causal_lm_labels(call, model):
    """Before: labels of the wrong shape were a broadcasting error from inside the loss (or an IndexError), float
    labels were truncated silently, and an out-of-range label gave a NaN loss (transformers raises)."""
    with pytest.raises(ValueError, match=r"labels has shape \(2, 3\), expected \(2, 4\)"):
        call(IDS, labels=IDS[:, :3])
    with pytest.raises(ValueError, match="labels must be integers"):
        call(IDS, labels=IDS.astype(np.float32))
    with pytest.raises(TypeError, match="labels must be an array"):
        call(IDS, labels=IDS.tolist())
    labels = IDS.copy()
    labels[1, 3] = 96
    with pytest.raises(ValueError, match=r"labels 96 at position \(1, 3\) is outside \[0, 96\)"):
        model(IDS, labels=labels)
    labels[1, 3] = -100
    assert np.isfinite(float(call(IDS, labels=labels).loss))


@pytest.mark.filterwarnings("error::UserWarning")  # numpy int64 labels warned in the loss's arange
def test_classification_labels(path):
    """Before: PhiForSequenceClassification took labels with the wrong number of rows silently (a loss over a
    reshaped, broadcast batch; transformers raises), and class ids out of range gave NaN in both heads."""
    seq = phi_jax.PhiForSequenceClassification.from_pretrained(path, allow_new_head=True)
    ids = IDS[:1]
    with pytest.raises(ValueError, match=r"labels has shape \(3,\); single-label classification"):
        seq(ids, labels=np.array([1, 0, 1]))
    with pytest.raises(ValueError, match=r"labels 5 at position \(0,\)"):
        seq(ids, labels=np.array([5]))
    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\); multi_label_classification takes \(1, 2\)"):
        seq(ids, labels=np.array([[1.0, 0.0, 1.0]]))
    assert np.isfinite(float(seq(ids, labels=np.array([1])).loss))
    assert np.isfinite(float(seq(ids, labels=np.array([[1.0, 0.0]])).loss))
    tok = phi_jax.PhiForTokenClassification.from_pretrained(path, allow_new_head=True)
    with pytest.raises(ValueError, match=r"labels 2 at position \(0, 1\)"):
        tok(ids, labels=np.array([[1, 2, 0, -100]]))
    with pytest.raises(ValueError, match="labels must be integers"):
        tok(ids, labels=np.array([[1.0, 0.0, 1.0, 0.0]]))


def test_generate_arguments(model):
    """Before: do_sample="no" sampled, a right-padded prompt continued from a padding column (a different
    completion than its unpadded self, silently), a str/array temperature or top_p, a float cache_length and a huge
    max_new_tokens raised TypeError/OverflowError from numpy; top_k=np.int64(5) and seed=np.array(3) were refused."""
    for kw, match in [(dict(do_sample="no"), "do_sample"), (dict(do_sample=True, temperature="0.7"), "temperature"),
                      (dict(do_sample=True, temperature=None), "temperature"),
                      (dict(do_sample=True, top_p=np.array([0.5, 0.9])), "top_p"),
                      (dict(cache_length=10.5), "cache_length"), (dict(cache_length="10"), "cache_length"),
                      (dict(max_new_tokens=10 ** 12), "max_new_tokens")]:
        for fn in (model.generate, lambda *a, **k: list(model.generate_stream(*a, **k))):
            with pytest.raises(ValueError, match=match):
                fn(IDS, **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="attention_mask row 0 ends in padding"):
        model.generate(IDS, np.array([[1, 1, 1, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    a = model.generate(IDS, max_new_tokens=2, do_sample=True, top_k=5, seed=3)
    b = model.generate(IDS, max_new_tokens=2, do_sample=True, top_k=np.int64(5), seed=np.array(3))
    np.testing.assert_array_equal(a, b)


def test_from_pretrained_arguments(path):
    """Before: "bf16" was numpy's TypeError, an int dtype failed in Flax's initialiser, np.float64 an AttributeError
    ('function' object has no attribute 'shape'), and a str mesh or a dict config AttributeErrors."""
    load = phi_jax.PhiForCausalLM.from_pretrained
    for kw, error, match in [(dict(dtype="bf16"), ValueError, "dtype='bf16' is not a dtype"),
                             (dict(param_dtype=jnp.int8), ValueError, "param_dtype=int8 is not a floating dtype"),
                             (dict(dtype=np.float64), ValueError, "dtype=float64 needs jax_enable_x64"),
                             (dict(mesh="data=1"), TypeError, "mesh must be a jax.sharding.Mesh"),
                             (dict(config={"vocab_size": 96}), TypeError, "config must be a phi_jax.PhiConfig")]:
        with pytest.raises(error, match=match):
            load(path, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(accum_steps=0), "TrainConfig.accum_steps"), (dict(learning_rate=float("nan")), "TrainConfig.learning_rate"),
    (dict(learning_rate=-1.0), "TrainConfig.learning_rate"), (dict(warmup_steps=-1), "TrainConfig.warmup_steps"),
    (dict(max_grad_norm=0.0), "TrainConfig.max_grad_norm"), (dict(b2=1.0), "TrainConfig.b2"),
])
def test_train_config_values(kw, match):
    """Before: accum_steps 0 was a ZeroDivisionError inside finetune; a NaN or negative rate, a negative warmup and
    a clipping norm of 0 trained silently wrong."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "RunConfig.steps"), (dict(batch_size=0), "RunConfig.batch_size"),
    (dict(seq_len=1), "RunConfig.seq_len"), (dict(keep=0), "RunConfig.keep"), (dict(seed=-1), "RunConfig.seed"),
    (dict(compute_dtype="bf16"), "RunConfig.compute_dtype"), (dict(save_every=0), "RunConfig.save_every"),
])
def test_run_config_values(kw, match):
    """Before: steps 0 trained nothing and returned, seq_len 1 reported losses of 0.0, batch_size 0 was an
    IndexError, seed -1 "expected non-negative integer", keep / save_every 0 were taken."""
    with pytest.raises(ValueError, match=match):
        RunConfig(model="m", data="d", output="o", **kw)
