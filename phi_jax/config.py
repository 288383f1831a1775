"""PhiConfig: transformers' PhiConfig as a frozen dataclass.

Field names are transformers' names. `from_pretrained` reads a `config.json` in
both layouts transformers has written:

- 4.x: `rope_theta`, `partial_rotary_factor` and `rope_scaling` at top level;
- 5.x: `rope_parameters = {"rope_type", "rope_theta", "partial_rotary_factor", "factor"}`.

`to_dict` writes the 5.x layout, which transformers 5 loads. Anything this port does
not implement (an unknown `hidden_act`, rope type or config key, a `model_type`
other than `phi`) raises `ValueError` naming the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_ACTIVATIONS = (
    "gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "quick_gelu", "relu", "silu", "swish",
)
# rope type -> the rope_parameters keys it reads (besides rope_type, rope_theta, partial_rotary_factor)
ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "yarn": frozenset({"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
                       "original_max_position_embeddings"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "longrope": frozenset({"short_factor", "long_factor", "factor", "attention_factor",
                           "original_max_position_embeddings"}),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_KEYS)
_NEEDS_FACTOR = ("linear", "dynamic", "llama3")
# scaling keys that may be null (transformers then derives them)
_ROPE_OPTIONAL_NUMBERS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")

# Keys that PretrainedConfig (4.x and 5.x) writes for every model; they carry no Phi semantics.
_GENERIC_KEYS = frozenset({
    "transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "_name_or_path", "auto_map", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "_attn_implementation", "_attn_implementation_autoset",
    "use_bfloat16", "pruned_heads", "torchscript", "decoder_start_token_id", "sep_token_id", "tf_legacy_loss",
    "custom_pipelines", "quantization_config", "_commit_hash", "model_type", "rope_scaling", "rope_theta",
    "partial_rotary_factor", "id2label", "label2id", "num_labels", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "output_router_logits",
})


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(config, name: str, has_type, what: str, in_range=lambda v: True, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if not has_type(value) or not in_range(value):
        raise ValueError(f"{name}={value!r} must be {what}")


class _RopeError(ValueError):
    """A rope setting outside what phi_jax supports (`from_dict` renames it as the config file spells it)."""


def _token_ids(config, name: str) -> list:
    """The ids a special-token field holds: [] for null, one id, or eos' list."""
    value = getattr(config, name)
    if value is None:
        return []
    if name == "eos_token_id" and isinstance(value, (list, tuple)):
        return list(value) or [None]  # an empty list is no id at all: rejected
    return [value]


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    """Hyper-parameters of a Phi model; see transformers' `PhiConfig` for each field."""

    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    qk_layernorm: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Heads (PretrainedConfig's generic fields that the classification heads read).
    id2label: dict | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    architectures: tuple[str, ...] | None = None

    def __post_init__(self):
        self.check_fields()
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        for name in ("layer_norm_eps", "initializer_range"):  # an int here (2**31) would reach jit as an int32
            object.__setattr__(self, name, float(getattr(self, name)))
        rope = dict(self.rope_parameters or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", 10000.0)
        rope.setdefault("partial_rotary_factor", 0.5)
        if rope["rope_type"] in ("yarn", "llama3", "longrope"):  # as transformers' standardize_rope_params
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        object.__setattr__(self, "rope_parameters", rope)
        if self.id2label is None:
            object.__setattr__(self, "id2label", {0: "LABEL_0", 1: "LABEL_1"})
        else:
            try:
                object.__setattr__(self, "id2label", {int(k): v for k, v in self.id2label.items()})
            except ValueError:
                raise ValueError(f"id2label={self.id2label!r} must map integer label ids to names") from None
        if self.architectures is not None:
            object.__setattr__(self, "architectures", tuple(self.architectures))
        self.validate()

    def check_fields(self) -> None:
        """Type and range of every field, before anything derives from them: ValueError naming field and value."""
        for name in _POSITIVE_INTS:
            _check(self, name, _is_int, "a positive integer", lambda v: v > 0)
        _check(self, "num_key_value_heads", _is_int, "a positive integer or null", lambda v: v > 0, optional=True)
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            _check(self, name, _is_number, "a probability in [0, 1)", lambda v: 0 <= v < 1)
        _check(self, "classifier_dropout", _is_number, "a probability in [0, 1) or null", lambda v: 0 <= v < 1,
               optional=True)
        _check(self, "initializer_range", _is_number, "a finite number >= 0", lambda v: 0 <= v < math.inf)
        _check(self, "layer_norm_eps", _is_number, "a finite number > 0", lambda v: 0 < v < math.inf)
        for name in ("use_cache", "tie_word_embeddings", "qk_layernorm"):
            _check(self, name, lambda v: isinstance(v, bool), "true or false")
        _check(self, "hidden_act", lambda v: isinstance(v, str), f"one of {SUPPORTED_ACTIVATIONS}",
               lambda v: v in SUPPORTED_ACTIVATIONS)
        _check(self, "rope_parameters", lambda v: isinstance(v, dict), "a dict or null", optional=True)
        _check(self, "id2label", lambda v: isinstance(v, dict), "a dict or null", optional=True)
        _check(self, "problem_type", lambda v: v in _PROBLEM_TYPES, f"one of {_PROBLEM_TYPES}")
        _check(self, "architectures", lambda v: isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v),
               "a list of class names or null", optional=True)
        rope = self.rope_parameters or {}
        for key, what, ok in (("rope_theta", "a finite number > 0", lambda v: 0 < v < math.inf),
                              ("partial_rotary_factor", "a number in [0, 1]", lambda v: 0 <= v <= 1),
                              ("factor", "a finite number > 0", lambda v: 0 < v < math.inf)):
            # null: no default stands in for it (transformers fails at the first forward), except for `factor`
            if key in rope and (rope[key] is not None or key != "factor") and not (_is_number(rope[key])
                                                                                 and ok(rope[key])):
                raise _RopeError(f"rope_parameters[{key!r}]={rope[key]!r} must be {what}")
        for key, value in rope.items():  # the scaling keys: their maths fails deep in rotary.py on a string or null
            if key in _ROPE_OPTIONAL_NUMBERS:
                ok, what = value is None or (_is_number(value) and math.isfinite(value)), "a finite number or null"
            elif key in ("low_freq_factor", "high_freq_factor"):
                ok, what = _is_number(value) and math.isfinite(value), "a finite number"
            elif key == "original_max_position_embeddings":
                ok, what = _is_int(value) and value > 0, "a positive integer"
            elif key == "truncate":
                ok, what = isinstance(value, bool), "true or false"
            elif key in ("short_factor", "long_factor"):
                ok = isinstance(value, (list, tuple)) and all(_is_number(v) and math.isfinite(v) for v in value)
                what = "a list of finite numbers"
            else:
                continue
            if not ok:
                raise _RopeError(f"rope_parameters[{key!r}]={value!r} must be {what}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            for token in _token_ids(self, name):
                if not _is_int(token) or not 0 <= token < self.vocab_size:
                    raise ValueError(f"{name}={getattr(self, name)!r} must be a token id in [0, vocab_size="
                                     f"{self.vocab_size}) or null" + (", or a list of them" if name == "eos_token_id"
                                                                     else ""))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Channels of each head that rotate: `int(head_dim * partial_rotary_factor)`."""
        return int(self.head_dim * self.rope_parameters["partial_rotary_factor"])

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def validate(self) -> None:
        """Consistency across fields; the rope settings' errors are `_RopeError`s (a ValueError)."""
        rope_type = self.rope_type
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
            raise _RopeError(f"rope type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        unknown = set(self.rope_parameters) - {"rope_type", "rope_theta", "partial_rotary_factor"} - ROPE_KEYS[rope_type]
        if unknown:
            raise _RopeError(f"rope_parameters has keys that rope type {rope_type!r} does not use: {sorted(unknown)}")
        factor = self.rope_parameters.get("factor")
        if (rope_type in _NEEDS_FACTOR or factor is not None) and (
                not isinstance(factor, (int, float)) or isinstance(factor, bool)):
            raise _RopeError(f"rope type {rope_type!r} needs a numeric 'factor', got {factor!r}")
        if rope_type == "dynamic" and self.head_dim * self.rope_parameters["partial_rotary_factor"] < 4:
            # its base grows as ** (dim / (dim - 2)): a division by zero at 2 channels (transformers too)
            raise _RopeError(f"rope type 'dynamic' needs at least 4 rotary channels per head; partial_rotary_factor="
                             f"{self.rope_parameters['partial_rotary_factor']!r} of head_dim {self.head_dim} gives "
                             f"{int(self.head_dim * self.rope_parameters['partial_rotary_factor'])}")
        if rope_type == "llama3":
            missing = {"low_freq_factor", "high_freq_factor"} - set(self.rope_parameters)
            if missing:
                raise _RopeError(f"rope type 'llama3' needs {sorted(missing)}")
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                value = self.rope_parameters.get(key)
                if not isinstance(value, (list, tuple)) or len(value) != self.rotary_ndims // 2:
                    raise _RopeError(f"rope type 'longrope' needs {key!r}, a list of rotary_ndims // 2 = "
                                     f"{self.rotary_ndims // 2} numbers, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rotary_ndims % 2:
            factor = self.rope_parameters["partial_rotary_factor"]
            raise ValueError(f"partial_rotary_factor={factor!r} gives int(head_dim {self.head_dim} * {factor}) = "
                             f"{self.rotary_ndims} rotary channels, an odd number")

    def __hash__(self):  # dict fields: hash the serialised form (NNX keeps the config in the static graph)
        return hash(self.to_json_string())

    def replace(self, **changes) -> "PhiConfig":
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhiConfig":
        """Builds a config from a transformers `config.json` dict (4.x or 5.x layout)."""
        d = dict(d)
        model_type = d.get("model_type", "phi")
        if model_type != "phi":
            raise ValueError(f"model_type={model_type!r} is not a Phi model (expected 'phi')")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _GENERIC_KEYS)
        if unknown:
            raise ValueError(f"config has keys phi_jax does not understand: {unknown}")
        # 4.x layout: rope settings at top level, scaling under `rope_scaling`.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}  # transformers: rope_scaling wins
        if not isinstance(rope, dict):
            name = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
            raise ValueError(f"{name}={rope!r} must be a dict or null")
        rope = dict(rope)
        if "rope_theta" in d:
            rope.setdefault("rope_theta", d["rope_theta"])
        if "partial_rotary_factor" in d:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["rope_parameters"] = rope
        if "num_labels" in d and (not _is_int(d["num_labels"]) or d["num_labels"] < 1):
            raise ValueError(f"num_labels={d['num_labels']!r} must be a positive integer")
        if "num_labels" in d and "id2label" not in d:
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(d["num_labels"])}
        try:
            return cls(**kwargs)
        except _RopeError as e:  # name the rope setting as the file spells it (4.x: top level, rope_scaling)
            message = str(e)
            scaling = d.get("rope_scaling") if isinstance(d.get("rope_scaling"), dict) else None
            top_level = [key for key in ("rope_theta", "partial_rotary_factor")
                         if key in d and key not in (scaling or {}) and f"rope_parameters[{key!r}]" in message]
            for key in top_level:
                message = message.replace(f"rope_parameters[{key!r}]", key)
            if scaling and not top_level:
                message = message.replace("rope_parameters", "rope_scaling")
                if "rope_scaling" not in message:
                    message = f"rope_scaling={scaling!r}: {message}"
            raise ValueError(message) from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PhiConfig":
        path = os.path.expanduser(os.fspath(path))
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if os.path.islink(file) and not os.path.exists(file):  # a cache snapshot copied without its blobs
            raise FileNotFoundError(f"{file} is a broken symlink (to {os.readlink(file)})")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{file} is not UTF-8 text ({e.reason})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{file} does not hold a JSON object")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def save_pretrained(self, directory: str | os.PathLike, *, architecture: str | None = None, dtype=None) -> str:
        """Writes `directory/config.json` (transformers 5.x layout), the one writer of config files.

        Args:
          architecture: the class name transformers should build (`architectures: [name]`); default: keep.
          dtype: the weights' dtype (`"float32"`, a numpy or jax dtype), recorded as `dtype`.
        """
        d = self.to_dict()
        if architecture is not None:
            d["architectures"] = [architecture]
        if dtype is not None:
            import numpy as np
            d["dtype"] = str(np.dtype(dtype))
        file = os.path.join(os.path.expanduser(os.fspath(directory)), "config.json")
        with open(file, "w") as f:
            f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return file

    def to_dict(self) -> dict[str, Any]:
        """A transformers 5.x `config.json` dict."""
        d = dataclasses.asdict(self)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = {v: k for k, v in self.id2label.items()}
        d["architectures"] = list(self.architectures) if self.architectures else None
        d["model_type"] = "phi"
        for k in ("problem_type", "classifier_dropout"):
            if d[k] is None:
                del d[k]
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def phi_1(**overrides) -> PhiConfig:
    """microsoft/phi-1 geometry (1.3B)."""
    return PhiConfig(**{**dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                num_attention_heads=32, rope_parameters=dict(partial_rotary_factor=0.5)), **overrides})


def phi_1_5(**overrides) -> PhiConfig:
    """microsoft/phi-1_5 geometry (1.4B); the same shapes as phi-1."""
    return phi_1(**overrides)


def phi_2(**overrides) -> PhiConfig:
    """microsoft/phi-2 geometry (2.7B): head_dim 80, 32 rotary channels per head."""
    return PhiConfig(**{**dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                num_attention_heads=32, bos_token_id=50256, eos_token_id=50256,
                                rope_parameters=dict(partial_rotary_factor=0.4)), **overrides})


