"""Data: tokenizing records, packing documents apart (segment ids, restarting positions), seeded batches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from phi_jax.compiled import compiled
from phi_jax.config import PhiConfig
from phi_jax.modeling.model import PhiForCausalLM
from phi_jax.train.data import Document, batch_at, load_dataset, pack
from train_fixtures import write_char_tokenizer, write_jsonl


def test_prompt_completion_targets_and_packing(tmp_path):
    vocab = write_char_tokenizer(tmp_path, 96)
    from phi_jax.train.data import load_tokenizer
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}, {"text": "the fox"}])
    rows = load_dataset(data, load_tokenizer(tmp_path), PhiConfig(vocab_size=96), seq_len=16)
    v = lambda s: [vocab[c] for c in s]  # noqa: E731
    eos = vocab["<|endoftext|>"]
    np.testing.assert_array_equal(rows["input_ids"][0], v("abcd") + [eos] + v("the fox") + [eos] + [0] * 3)
    np.testing.assert_array_equal(rows["attention_mask"][0], [1] * 5 + [2] * 8 + [0] * 3)
    np.testing.assert_array_equal(rows["position_ids"][0], list(range(5)) + list(range(8)) + [0] * 3)
    # prompt tokens and each document's first token are no target; the completion and eos are
    np.testing.assert_array_equal(rows["labels"][0], [-100, -100] + v("cd") + [eos] + [-100] + v("he fox")
                                  + [eos] + [-100] * 3)


def test_long_documents_split_and_rows_fill_greedily():
    docs = [Document(np.arange(1, 11, dtype=np.int32), np.ones(10, bool)),
            Document(np.arange(20, 23, dtype=np.int32), np.ones(3, bool))]
    rows = pack(docs, seq_len=4)
    # pieces: [1..4] [5..8] [9,10] [20,21,22]; [9,10] and [20..22] do not fit together in 4
    np.testing.assert_array_equal(rows["input_ids"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0], [20, 21, 22, 0]])
    np.testing.assert_array_equal(rows["attention_mask"], [[1] * 4, [1] * 4, [1, 1, 0, 0], [1, 1, 1, 0]])


def test_batches_are_a_function_of_seed_and_step():
    rows = {"input_ids": np.arange(10)[:, None].repeat(3, 1)}
    epoch = [batch_at(rows, s, 2, seed=7)["input_ids"][:, 0] for s in range(5)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(10))  # each row once per epoch
    np.testing.assert_array_equal(batch_at(rows, 3, 2, seed=7)["input_ids"], batch_at(rows, 3, 2, seed=7)["input_ids"])
    assert not np.array_equal(np.concatenate(epoch), np.concatenate(
        [batch_at(rows, s, 2, seed=8)["input_ids"][:, 0] for s in range(5)]))
    nxt = np.concatenate([batch_at(rows, s, 2, seed=7)["input_ids"][:, 0] for s in range(5, 10)])
    assert sorted(nxt.tolist()) == list(range(10)) and not np.array_equal(nxt, np.concatenate(epoch))


def test_packed_documents_stay_apart(make_checkpoint):
    """Each document's logits in a packed row equal those of the document run alone."""
    path, _ = make_checkpoint("phi1")
    model = PhiForCausalLM.from_pretrained(path)
    rng = np.random.default_rng(0)
    docs = [Document(rng.integers(0, 96, n).astype(np.int32), np.ones(n, bool)) for n in (5, 9, 4)]
    rows = pack(docs, seq_len=20)
    assert len(rows["input_ids"]) == 1
    run = compiled(model)  # (one program per shape; the model called eagerly took 19 s)
    packed = run(jnp.asarray(rows["input_ids"]), jnp.asarray(rows["attention_mask"]),
                 jnp.asarray(rows["position_ids"])).logits[0]
    start = 0
    for d in docs:
        alone = run(jnp.asarray(d.ids[None])).logits[0]
        assert rel_err(packed[start:start + len(d.ids)], alone) <= 1e-5
        start += len(d.ids)


def test_token_outside_the_vocabulary_names_file_and_line(tmp_path):
    """The error names `file:line` of the record, counting blank lines (record 3 is on line 5)."""
    from phi_jax.train.data import load_tokenizer
    vocab = write_char_tokenizer(tmp_path, 96)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "0"}, "", {"text": "1"}, "  ", {"text": "zz"}])
    cfg = PhiConfig(vocab_size=vocab["z"])  # every id fits but z's
    with pytest.raises(ValueError, match=rf"^{tmp_path}/d.jsonl:5: token id {vocab['z']} >= the model's vocab_size"):
        load_dataset(data, load_tokenizer(tmp_path), cfg, seq_len=16)
