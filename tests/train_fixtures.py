"""Helpers shared by the training tests: a character-level tokenizer.json and JSON-lines data."""

from __future__ import annotations

import json
import os

TEXT = "the quick brown fox jumps over the lazy dog. "


def write_char_tokenizer(directory, vocab_size: int, text: str = TEXT + "0123456789:?!,\n") -> dict:
    """A `tokenizers` WordLevel tokenizer over single characters (id 0 = <|endoftext|>); returns its vocab."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    chars = sorted(set(text))
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(os.fspath(directory), "tokenizer.json"))
    return vocab


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return os.fspath(path)
