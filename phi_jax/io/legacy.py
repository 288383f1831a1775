"""Microsoft's original Phi checkpoint layouts (before transformers' own Phi class), mapped to HF names.

Two key styles, both with a fused `Wqkv` whose rows are q (all heads), then k, then v:

- `mixformer-sequential` (phi-1, phi-1.5): `layers.0.wte.weight`; block i at `layers.{i+1}.{ln, mixer.Wqkv,
  mixer.out_proj, mlp.fc1, mlp.fc2}`; the head at `layers.{N+1}.{ln, linear}`.
- `phi-msft` (phi-2): `transformer.embd.wte.weight`; `transformer.h.{i}.{...}`; `lm_head.{ln, linear}`.

`legacy_table(keys, config)` maps each HF key to `(legacy key, rows or None)`; `legacy_config(d)` maps the old
`config.json` (`n_embd`, `n_layer`, `rotary_dim`, ...) to a PhiConfig and rejects keys it does not understand.
"""

from __future__ import annotations

import re

from phi_jax.config import _GENERIC_KEYS, PhiConfig
from phi_jax.io.names import is_buffer

_BLOCK = {"ln": "input_layernorm", "mixer.out_proj": "self_attn.dense", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_SEQ = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_MSFT = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
LEGACY_MODEL_TYPES = ("phi-msft", "mixformer-sequential")


def legacy_style(keys) -> str | None:
    """'phi-msft', 'mixformer-sequential' or None (not a legacy layout)."""
    keys = set(keys)
    if "transformer.embd.wte.weight" in keys or any(k.startswith("transformer.h.") for k in keys):
        return "phi-msft"
    if "layers.0.wte.weight" in keys:
        return "mixformer-sequential"
    return None


def legacy_table(keys, config: PhiConfig, where: str = "checkpoint") -> dict[str, tuple[str, tuple[int, int] | None]]:
    """HF key -> (legacy key, row range of a fused Wqkv or None). Raises ValueError on keys it cannot place."""
    style = legacy_style(keys)
    if style is None:
        raise ValueError(f"{where}: no Microsoft Phi layout found (expected 'transformer.embd.wte.weight' or "
                         f"'layers.0.wte.weight')")
    n, d = config.num_hidden_layers, config.hidden_size
    kv = config.num_key_value_heads * config.head_dim
    qkv_rows = {"q_proj": (0, d), "k_proj": (d, d + kv), "v_proj": (d + kv, d + 2 * kv)}
    table, unexpected = {}, []
    for key in sorted(keys):
        if is_buffer(key):
            continue
        hf = []
        if style == "phi-msft":
            m = _MSFT.match(key)
            block = (int(m.group(1)), m.group(2), m.group(3)) if m else None
            top = {"transformer.embd.wte.weight": "model.embed_tokens.weight",
                   "lm_head.ln.weight": "model.final_layernorm.weight", "lm_head.ln.bias": "model.final_layernorm.bias",
                   "lm_head.linear.weight": "lm_head.weight", "lm_head.linear.bias": "lm_head.bias"}.get(key)
        else:
            m = _SEQ.match(key)
            block, top = None, None
            if key == "layers.0.wte.weight":
                top = "model.embed_tokens.weight"
            elif m and int(m.group(1)) == n + 1 and m.group(2) in ("ln", "linear"):
                top = {"ln": "model.final_layernorm.", "linear": "lm_head."}[m.group(2)] + m.group(3)
            elif m and 1 <= int(m.group(1)) <= n:
                block = (int(m.group(1)) - 1, m.group(2), m.group(3))
        if top:
            hf = [(top, None)]
        elif block and block[0] < n:
            i, name, leaf = block
            prefix = f"model.layers.{i}."
            if name == "mixer.Wqkv":
                hf = [(f"{prefix}self_attn.{p}.{leaf}", rows) for p, rows in qkv_rows.items()]
            elif name in _BLOCK:
                hf = [(f"{prefix}{_BLOCK[name]}.{leaf}", None)]
        if not hf:
            unexpected.append(key)
        for h, rows in hf:
            table[h] = (key, rows)
    if unexpected:
        raise ValueError(f"{where}: tensors that do not fit a {style} Phi layout with num_hidden_layers={n}: "
                         f"{unexpected}")
    return table


# Old config keys -> PhiConfig fields.
_RENAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_head_kv": "num_key_value_heads", "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
            "layer_norm_epsilon": "layer_norm_eps", "activation_function": "hidden_act", "attn_pdrop": "attention_dropout",
            "vocab_size": "vocab_size", "embd_pdrop": "embd_pdrop", "resid_pdrop": "resid_pdrop",
            "initializer_range": "initializer_range", "tie_word_embeddings": "tie_word_embeddings",
            "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
            "use_cache": "use_cache"}
# Keys with no effect on the maths of inference (kernel choices, padding already applied to vocab_size, metadata).
# Plus the keys PretrainedConfig writes for every model (`to_dict()`, e.g. `id2label`, `output_attentions`): the
# original config classes inherit them, so a config.json written in full carries them. Not the rope keys: the
# original code has no such setting (base 10000, `rotary_dim`), so a Microsoft config holding one is refused.
_IGNORED = {"flash_attn", "flash_rotary", "fused_dense", "checkpointing", "gradient_checkpointing",
            "pad_vocab_size_multiple", "phyagi_version", "architectures", "auto_map", "torch_dtype", "dtype",
            "transformers_version", "_name_or_path", "model_type", "return_dict", "softmax_scale", "problem_type",
            } | (_GENERIC_KEYS - {"rope_scaling", "rope_theta", "partial_rotary_factor"})


def legacy_config(d: dict, where: str = "config.json") -> PhiConfig:
    """PhiConfig from a Microsoft `phi-msft` / `mixformer-sequential` config dict.

    Special-token ids are copied when the config has them and stay None when it has none (never invented: a
    default such as 50256 would lie outside a small vocabulary).
    """
    d = dict(d)
    model_type = d.get("model_type")
    if model_type not in LEGACY_MODEL_TYPES:
        raise ValueError(f"{where}: model_type={model_type!r} is not a Microsoft Phi layout {LEGACY_MODEL_TYPES}")
    problems = []
    if d.get("img_processor") is not None:
        problems.append(f"img_processor={d['img_processor']!r} (multimodal) is not supported")
    d.pop("img_processor", None)
    arch = d.pop("architecture", None) or {}
    if not isinstance(arch, dict) or not all(isinstance(arch.get(k, {}), dict) for k in ("mixer", "mlp")):
        raise ValueError(f"{where}: architecture={arch!r} must be an object whose 'mixer' and 'mlp' are objects")
    if arch.get("block_cls", "parallel") != "parallel":
        problems.append(f"architecture.block_cls={arch['block_cls']!r}; only the parallel block is supported")
    if arch.get("mlp", {}).get("mlp_cls", "mlp") not in ("mlp", "fused_mlp"):
        problems.append(f"architecture.mlp={arch['mlp']!r} is not supported")
    if set(arch.get("mixer", {})) - {"mixer_cls"}:
        problems.append(f"architecture.mixer={arch['mixer']!r} is not supported")
    if d.pop("embd_layer", "default") != "default":
        problems.append("embd_layer other than 'default' is not supported")
    unknown = sorted(k for k in d if k not in _RENAMES and k not in _IGNORED and k != "rotary_dim")
    if unknown:
        problems.append(f"keys phi_jax does not understand: {unknown}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    kw = {_RENAMES[k]: v for k, v in d.items() if k in _RENAMES}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kw.setdefault(name, None)
    inner = kw.pop("intermediate_size", None)
    kw["architectures"] = ("PhiForCausalLM",)
    try:
        config = PhiConfig(**kw)  # every field checked for type and range (n_embd -> hidden_size, ...)
        head_dim = config.head_dim
        rotary_dim = d.get("rotary_dim", min(32, head_dim))
        if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim={rotary_dim!r} must be an integer in (0, head_dim={head_dim}]")
        factor = rotary_dim / head_dim
        if int(head_dim * factor) != rotary_dim:
            raise ValueError(f"rotary_dim={rotary_dim} is not representable as a partial_rotary_factor")
        return config.replace(
            intermediate_size=4 * config.hidden_size if inner is None else inner,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
