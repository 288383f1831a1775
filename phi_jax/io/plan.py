"""The one check between a checkpoint and a model, shared by `from_pretrained` and `convert`.

`check_config(config, tensors)` compares the config's sizes with the tensors' names and shapes before any model
is built (a config with 10**9 layers on a 1-layer checkpoint fails at once, naming `num_hidden_layers`).
`plan(source, params, class_name)` then matches every parameter of the (abstract) model to a checkpoint tensor:
the `model.` prefix that a PhiModel checkpoint lacks and a head checkpoint has, buffers skipped by name
(`rotary_emb.inv_freq`), heads the class does not have skipped, a tied `lm_head.weight` skipped, a missing
classification head allowed with `allow_new_head`; every missing, unexpected or mis-shaped tensor is named in
one ValueError. The model class is never imported here: callers pass its abstract parameter state.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import ml_dtypes
import numpy as np
from flax import nnx

from phi_jax.config import PhiConfig
from phi_jax.io.names import HEAD_PREFIXES, hf_key, is_buffer

log = logging.getLogger(__name__)
# The dtypes a weight may have in a checkpoint (cast to param_dtype at load); an integer, bool or float8 tensor under
# a weight's name is a damaged or quantized file, never silently cast.
WEIGHT_DTYPES = frozenset(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its checkpoint key, NNX path, whether the Linear kernel transposes, HF-layout shape,
    the checkpoint's dtype and the file holding it."""

    key: str
    path: tuple
    transpose: bool
    shape: tuple
    dtype: np.dtype
    file: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """`entries` in NNX order; `new_heads`: NNX paths of heads to initialise (`allow_new_head`)."""

    entries: list[Entry]
    new_heads: list[tuple]


def hf_layout(params: nnx.State) -> list[tuple[tuple, str, bool, tuple]]:
    """(NNX path, HF key, transposed?, HF-layout shape) of every parameter in `params` (abstract or concrete),
    in NNX order: the one map from our parameters to transformers' tensors."""
    out = []
    for path, var in nnx.to_flat_state(params):
        key, transpose = hf_key(path)
        shape = tuple(var.get_value().shape)
        out.append((path, key, transpose, shape[::-1] if transpose else shape))
    return out


def abstract_params(cls, config: PhiConfig, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, `nnx.Param` state) of `cls(config, **kwargs)`, shapes only: nothing is allocated. The class is
    passed in; io imports no model."""
    graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **kwargs)), nnx.Param, ...)
    return graphdef, params


def check_config(config: PhiConfig, tensors: dict, where: str = "checkpoint") -> None:
    """Raises ValueError naming the first config field whose value the tensors contradict, its value, and the
    tensor (name, file, shape) that says otherwise. Tensors the config does not mention are left to `plan`."""
    def find(name, ndim):  # (key, shape, file) of the tensor `name` when it has `ndim` axes (else `plan` reports it)
        for key in (name, "model." + name):
            if key in tensors and len(tensors[key][0]) == ndim:
                return key, tuple(tensors[key][0]), tensors[key][2]
        return None

    def fail(field, value, what):
        raise ValueError(f"{where}: config {field}={value!r} does not fit the checkpoint: {what}")

    c = config
    emb = find("embed_tokens.weight", 2)
    if emb:
        key, (vocab, hidden), file = emb
        if hidden != c.hidden_size:
            fail("hidden_size", c.hidden_size, f"{key} in {file} has shape {[vocab, hidden]} (hidden size {hidden})")
        if vocab != c.vocab_size:
            fail("vocab_size", c.vocab_size, f"{key} in {file} has shape {[vocab, hidden]} ({vocab} tokens)")
    layer_of = {k: int(m.group(1)) for k in tensors if (m := _LAYER.match(k))}
    layers = set(layer_of.values())
    if layers and max(layers) + 1 != c.num_hidden_layers:
        n = max(layers) + 1
        if layers != set(range(n)) and max(layers) >= c.num_hidden_layers:  # a gap: stray tensors, not a depth
            stray = sorted(k for k, i in layer_of.items() if i >= c.num_hidden_layers)
            raise ValueError(f"{where}: tensors past the config's num_hidden_layers={c.num_hidden_layers} (the "
                             f"checkpoint holds layers {sorted(layers)}, with gaps): {stray[:5]} in "
                             f"{tensors[stray[0]][2]}")
        fail("num_hidden_layers", c.num_hidden_layers, f"it holds {n} layer{'s' * (n != 1)} (layers.0 to "
                                                       f"layers.{n - 1})" if layers == set(range(n)) else
             f"it holds layers {sorted(layers)}")
    fc1 = find("layers.0.mlp.fc1.weight", 2)
    if fc1 and fc1[1][0] != c.intermediate_size:
        fail("intermediate_size", c.intermediate_size, f"{fc1[0]} in {fc1[2]} has shape {list(fc1[1])}")
    q_norm = find("layers.0.self_attn.q_layernorm.weight", 1)
    if bool(q_norm) != c.qk_layernorm and layers:
        fail("qk_layernorm", c.qk_layernorm, "it holds q_layernorm weights" if q_norm else "it holds no q_layernorm")
    if q_norm and q_norm[1][0] != c.head_dim:
        fail("num_attention_heads", c.num_attention_heads,
             f"head_dim {c.head_dim} (hidden_size / num_attention_heads), but {q_norm[0]} in {q_norm[2]} has shape "
             f"{list(q_norm[1])} (head_dim {q_norm[1][0]}: {c.hidden_size // max(1, q_norm[1][0])} heads)")
    k_proj = find("layers.0.self_attn.k_proj.weight", 2)
    if k_proj and k_proj[1][0] != c.num_key_value_heads * c.head_dim:
        field = "num_key_value_heads" if k_proj[1][0] % c.head_dim == 0 else "num_attention_heads"
        fail(field, getattr(c, field),
             f"{c.num_key_value_heads} kv heads of head_dim {c.head_dim} (hidden_size {c.hidden_size} / "
             f"{c.num_attention_heads} heads) need {c.num_key_value_heads * c.head_dim} rows in {k_proj[0]}, which "
             f"has shape {list(k_proj[1])} in {k_proj[2]}")
    head = find("lm_head.weight", 2)
    if head and head[1][0] != c.vocab_size:
        fail("vocab_size", c.vocab_size, f"{head[0]} in {head[2]} has shape {list(head[1])}")


def plan(source, params: nnx.State, class_name: str, *, allow_new_head: bool = False) -> Plan:
    """Matches the abstract `params` (an `nnx.Param` state) of a `class_name` model to `source.tensors`.

    Raises ValueError naming each missing, unexpected or mis-shaped tensor and the file holding it.
    """
    layout = hf_layout(params)
    tensors, config = source.tensors, source.config
    ours_prefixed = any(path[0] == "model" for path, *_ in layout)
    theirs_prefixed = any(k.startswith("model.") for k in tensors)

    def checkpoint_key(key: str) -> str:  # a PhiModel has no `model.` prefix; a head checkpoint does
        if ours_prefixed and not theirs_prefixed and key.startswith("model."):
            return key[len("model."):]
        if not ours_prefixed and theirs_prefixed:
            return "model." + key
        return key

    entries, new_heads, missing, mismatched, bad_dtypes = [], [], [], [], []
    own_heads = set()
    for path, key, transpose, want in layout:
        if key.startswith(HEAD_PREFIXES):
            own_heads.add(key)
        src = checkpoint_key(key)
        if src not in tensors:
            if allow_new_head and key.startswith("score."):
                new_heads.append(path)
            else:
                missing.append(src)
            continue
        got, dtype, file = tensors[src]
        if tuple(got) != want:
            mismatched.append(f"{src} in {file}: checkpoint has {list(got)}, the config expects {list(want)}")
        if np.dtype(dtype) not in WEIGHT_DTYPES:
            bad_dtypes.append(f"{src} in {file} is {np.dtype(dtype).name}")
        entries.append(Entry(src, path, transpose, want, np.dtype(dtype), file))
    used = {e.key for e in entries}
    unexpected = []
    for key in sorted(set(tensors) - used):
        if is_buffer(key) or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue  # a buffer, or the tied lm_head that the embedding serves as
        if key.startswith(HEAD_PREFIXES) and key not in own_heads:
            log.info("skipping %s: a head that %s does not have", key, class_name)
            continue
        unexpected.append(key)
    problems = [f"{name}: {value}" for name, value in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("shape mismatches", "; ".join(mismatched)),
        ("weights that are not float16, bfloat16, float32 or float64", "; ".join(bad_dtypes))) if value]
    if problems:
        raise ValueError(f"checkpoint {source.directory} does not fit {class_name} with its config "
                         f"(hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, "
                         f"vocab_size={config.vocab_size}): " + " | ".join(problems))
    return Plan(entries, new_heads)
