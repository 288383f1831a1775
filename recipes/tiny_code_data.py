"""Corpus and tokenizer for the tiny code model: the installed CPython's standard library.

The corpus is every `.py` file under `sysconfig.get_paths()["stdlib"]` except tests, site-packages,
generated tables and IDLE (see `EXCLUDED_DIRS`, `EXCLUDED_FILES`). A fixed 1-in-`HOLDOUT_MODULUS`
share of the files, picked by a hash of the relative path (so the split does not depend on the order
files are listed in, or on which other files exist), is held out for validation.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the training files only,
saved as `tokenizer.json` plus a `tokenizer_config.json` that transformers' `AutoTokenizer` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig

EOS = "<|endoftext|>"
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__", "ensurepip",
    "encodings",  # generated codec tables (cp1252.py, ...): long runs of hex literals, not code anyone writes
    "pydoc_data",  # topics.py is a 700 KB string of documentation
    "turtledemo", "lib2to3",  # demos and a deprecated tool with grammar/fixer test data
})
EXCLUDED_FILES = frozenset({"this.py", "antigravity.py", "__hello__.py", "__phello__.foo.py"})
HOLDOUT_MODULUS = 20


def stdlib_root() -> str:
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return f"{sys.implementation.name} {sys.version.split()[0]}"


def list_files(root: str) -> list[str]:
    """Relative paths (POSIX separators) of the corpus files, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        for name in filenames:
            if name.endswith(".py") and name not in EXCLUDED_FILES and not name.startswith("_sysconfigdata"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


def is_held_out(relpath: str) -> bool:
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % HOLDOUT_MODULUS == 0


def read_source(root: str, relpath: str) -> str:
    """The file's text exactly as stored (UTF-8, newlines untranslated)."""
    path = os.path.join(root, relpath)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 at byte {e.start}") from None


def split_files(root: str) -> tuple[list[str], list[str]]:
    files = list_files(root)
    train = [f for f in files if not is_held_out(f)]
    valid = [f for f in files if is_held_out(f)]
    return train, valid


def file_digest(root: str, relpath: str) -> str:
    with open(os.path.join(root, relpath), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (GPT-2's pre-tokenizer regex, no normalizer: decode(encode(s)) == s for any string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, directory: str, model_max_length: int) -> None:
    """`tokenizer.json` + `tokenizer_config.json` (transformers' fast tokenizer over the same file)."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
