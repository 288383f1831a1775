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


def tiny_run(make_checkpoint, tmp_path, **overrides) -> tuple[str, str]:
    """A 1-layer random phi-1 checkpoint with the character tokenizer, and a JSON-lines file of text and
    prompt/completion records: (model directory, data file) for a fine-tuning run of a few seconds."""
    path, _ = make_checkpoint("phi1", num_hidden_layers=1, intermediate_size=128, **overrides)
    write_char_tokenizer(path, 96)
    data = write_jsonl(os.path.join(os.fspath(tmp_path), "data.jsonl"),
                       [{"text": TEXT * 3}] * 4 + [{"prompt": "2+2=", "completion": "4!"}])
    return path, data


DROPOUT = dict(embd_pdrop=0.1, attention_dropout=0.1, resid_pdrop=0.1)  # every dropout of Phi on


def checkpoint_steps(out) -> list[int]:
    """The steps of the checkpoints in run directory `out`."""
    return sorted(int(d) for d in os.listdir(os.path.join(os.fspath(out), "checkpoints")) if d.isdigit())


def metrics(out) -> list[dict]:
    """The records of `out/metrics.jsonl`."""
    with open(os.path.join(os.fspath(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
