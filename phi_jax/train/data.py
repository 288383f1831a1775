"""JSON-lines records -> tokenized documents -> fixed-length packed rows -> shuffled batches.

A record is `{"text": ...}` (every token is a target) or `{"prompt": ..., "completion": ...}` (only the
completion's tokens are targets). Each document ends with the end-of-text token. Rows are `seq_len` tokens;
documents are packed whole (a longer one is cut into `seq_len` pieces), each row's documents numbered 1, 2, ...
in `attention_mask` (0 = padding) so that no token attends across documents, `position_ids` restarting at 0
for each document, and `labels` = the token where it is a target, else -100 (prompt tokens, padding and the
first token of each document, which no token of the same document predicts).

Batches are a pure function of (seed, step): the row order of each epoch is a permutation drawn from
`(seed, epoch)`, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from phi_jax.io.jsonl import read_jsonl
from phi_jax.modeling.losses import IGNORE_INDEX

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


@dataclasses.dataclass(frozen=True)
class Document:
    ids: np.ndarray  # [L] int32
    targets: np.ndarray  # [L] bool: the token is a prediction target (its label counts in the loss)


def read_records(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON-lines file; a bad line raises `ValueError` naming the file and line number."""
    return [rec for _, rec in _numbered_records(path)]


def _numbered_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """`read_records` with each record's `file:line` (blank lines are skipped, so the index is not the line)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    for n, _, rec in read_jsonl(path, lambda n: f"{path}:{n}"):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        keys = set(rec)
        if keys == {"text"}:
            fields = ("text",)
        elif keys == {"prompt", "completion"}:
            fields = ("prompt", "completion")
        else:
            raise ValueError(f"{path}:{n}: expected keys {{'text'}} or {{'prompt', 'completion'}}, "
                             f"got {sorted(keys)}")
        for k in fields:
            if not isinstance(rec[k], str):
                raise ValueError(f"{path}:{n}: field {k!r} must be a string, got {type(rec[k]).__name__}")
        if not "".join(rec[k] for k in fields):
            raise ValueError(f"{path}:{n}: empty record")
        records.append((f"{path}:{n}", rec))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's `tokenizer.json` (`phi_jax.io.tokenizer`: the `tokenizers` library, no transformers), with
    any truncation or padding it records switched off: documents are packed whole (truncation cut every record
    silently, padding trained the model on pad tokens)."""
    from phi_jax.io.tokenizer import read_tokenizer
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(os.path.expanduser(model_dir), "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {model_dir} (fine-tuning tokenizes with it)")
    return read_tokenizer(model_dir)


def eos_id(tokenizer, config) -> int:
    """The end-of-text id: the tokenizer's own end token if it has one, else the config's `eos_token_id`."""
    for tok in EOS_TOKENS:
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return i
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token and the config no eos_token_id")
    return int(eos)


def tokenize(records: list[dict], tokenizer, eos: int, vocab_size: int,
             where: list[str] | None = None) -> list[Document]:
    """Each record as one document: its tokens then `eos`; prompt tokens are not targets.

    `where`: each record's location for errors (`file:line`; default `record N`, counting from 1).
    """
    docs = []
    for n, rec in enumerate(records):
        parts = [(rec["text"], True)] if "text" in rec else [(rec["prompt"], False), (rec["completion"], True)]
        ids, targets = [], []
        for text, is_target in parts:
            enc = tokenizer.encode(text, add_special_tokens=False).ids
            ids += enc
            targets += [is_target] * len(enc)
        ids.append(eos)
        targets.append(True)
        arr = np.asarray(ids, np.int32)
        if arr.max() >= vocab_size:
            at = f"record {n + 1}" if where is None else where[n]
            raise ValueError(f"{at}: token id {int(arr.max())} >= the model's vocab_size {vocab_size}")
        docs.append(Document(arr, np.asarray(targets, bool)))
    return docs


def pack(docs: list[Document], seq_len: int) -> dict[str, np.ndarray]:
    """Greedy packing in order: a document that does not fit the current row starts the next one.

    Returns `input_ids`, `attention_mask` (segment ids, 0 = padding), `position_ids`, `labels`, each `[R, seq_len]`.
    """
    pieces = []
    for d in docs:
        for s in range(0, len(d.ids), seq_len):
            pieces.append((d.ids[s:s + seq_len], d.targets[s:s + seq_len]))
    rows, row, used = [], [], 0
    for p in pieces:
        if used + len(p[0]) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(p)
        used += len(p[0])
    if row:
        rows.append(row)
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("input_ids", "attention_mask", "position_ids")}
    out["labels"] = np.full((len(rows), seq_len), IGNORE_INDEX, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for seg, (ids, targets) in enumerate(row, 1):
            end = start + len(ids)
            out["input_ids"][r, start:end] = ids
            out["attention_mask"][r, start:end] = seg
            out["position_ids"][r, start:end] = np.arange(len(ids))
            labels = np.where(targets, ids, IGNORE_INDEX)
            labels[0] = IGNORE_INDEX  # no token of this document predicts its first
            out["labels"][r, start:end] = labels
            start = end
    return out


def load_dataset(path, tokenizer, config, seq_len: int) -> dict[str, np.ndarray]:
    """`read_records` -> `tokenize` -> `pack`."""
    where, records = zip(*_numbered_records(path))
    docs = tokenize(list(records), tokenizer, eos_id(tokenizer, config), config.vocab_size, list(where))
    return pack(docs, seq_len)


def digest(rows: dict[str, np.ndarray]) -> str:
    """A short hex digest of packed rows (every array's name, shape, dtype and values): equal digests, equal
    batches for every (seed, step)."""
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(rows):
        v = np.ascontiguousarray(rows[k])
        h.update(f"{k}:{v.shape}:{v.dtype};".encode())
        h.update(v.data)
    return h.hexdigest()


def batch_at(rows: dict[str, np.ndarray], step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The batch of global step `step` (rows `step*batch_size ...`, epochs reshuffled by `(seed, epoch)`)."""
    n = len(rows["input_ids"])
    orders, idx = {}, []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng((seed, epoch)).permutation(n)
        idx.append(orders[epoch][j])
    return {k: v[np.asarray(idx)] for k, v in rows.items()}
