"""Where the shipped model lives: a Hugging Face directory inside the installed package.

It holds `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` (transformers'
`AutoTokenizer` and `PhiForCausalLM` load it as they are), `metrics.json` (how it was trained: Python
version, files, steps, wall time, losses), `valid_slice.safetensors` (the validation rows whose loss
metrics.json records) and `loss_curve.png`.
"""

from __future__ import annotations

import os

SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json")


def shipped_model_path() -> str:
    """The directory of the shipped tiny code model, e.g. `PhiForCausalLM.from_pretrained(shipped_model_path())`.

    Raises FileNotFoundError naming the first missing file (an install without the package data).
    """
    directory = os.path.dirname(os.path.abspath(__file__))
    for name in SHIPPED_FILES:
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"the shipped model is incomplete: {os.path.join(directory, name)} is missing")
    return directory
