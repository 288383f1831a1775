"""save_pretrained over an existing checkpoint: one consistent checkpoint afterwards, the old one after a failure;
relative paths everywhere; a missing directory named at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import phi_jax
from phi_jax import convert
from phi_jax.io.safetensors import ShardedSafetensorsWriter

IDS = np.random.default_rng(3).integers(0, 96, (2, 7)).astype(np.int32)


def _ours(path) -> np.ndarray:
    return np.asarray(phi_jax.PhiForCausalLM.from_pretrained(path)(jnp.asarray(IDS)).logits)


def _theirs(path) -> np.ndarray:
    model = transformers.PhiForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.numpy()


def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".")]


@pytest.fixture
def old_and_new(make_checkpoint):
    """A sharded transformers checkpoint (seed 0) with a tokenizer file, and a phi_jax model of other weights."""
    old, _ = make_checkpoint("phi1", fmt="sharded", seed=0)
    with open(os.path.join(old, "tokenizer.json"), "w") as f:
        f.write("{}")
    src, _ = make_checkpoint("phi1", seed=1)
    return old, phi_jax.PhiForCausalLM.from_pretrained(src)


def test_save_over_sharded_checkpoint_replaces_it(old_and_new):
    old, model = old_and_new
    before = _ours(old)
    model.save_pretrained(old)
    assert sorted(os.listdir(old)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    new = np.asarray(model(jnp.asarray(IDS)).logits)
    assert np.abs(new - before).max() > 1  # the weights really differ
    np.testing.assert_array_equal(_ours(old), new)
    np.testing.assert_allclose(_theirs(old), new, atol=1e-4 * new.std())
    assert not _leftovers(os.path.dirname(old))


def test_save_over_orbax_directory_replaces_it(old_and_new, tmp_path):
    old, model = old_and_new
    convert.hf_to_orbax(old, tmp_path / "orbax")
    model.save_pretrained(tmp_path / "orbax")
    assert sorted(os.listdir(tmp_path / "orbax")) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json"]
    np.testing.assert_array_equal(_ours(tmp_path / "orbax"), np.asarray(model(jnp.asarray(IDS)).logits))


def test_single_file_and_index_read_as_transformers_does(make_checkpoint):
    """transformers prefers model.safetensors over model.safetensors.index.json; so does phi_jax."""
    both, _ = make_checkpoint("phi1", fmt="sharded", seed=0)
    single, _ = make_checkpoint("phi1", seed=1)
    shutil.copy(os.path.join(single, "model.safetensors"), both)
    np.testing.assert_array_equal(_ours(both), _ours(single))
    np.testing.assert_allclose(_theirs(both), _ours(single), atol=1e-4 * _ours(single).std())


def test_failed_save_leaves_the_old_checkpoint(old_and_new, monkeypatch):
    old, model = old_and_new
    before, files = _ours(old), sorted(os.listdir(old))
    put, calls = ShardedSafetensorsWriter.put, []

    def failing_put(self, key, arr):
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk full")
        put(self, key, arr)

    monkeypatch.setattr(ShardedSafetensorsWriter, "put", failing_put)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(old)
    assert sorted(os.listdir(old)) == files and not _leftovers(os.path.dirname(old))
    np.testing.assert_array_equal(_ours(old), before)


_KILLED = textwrap.dedent("""
    import signal, sys, time
    # SIGINT raises KeyboardInterrupt even when the runner started in the background (nohup, `&`), which
    # hands its children SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import phi_jax
    from phi_jax.io.safetensors import ShardedSafetensorsWriter
    put = ShardedSafetensorsWriter.put
    def slow_put(self, key, arr):
        print("tensor", key, flush=True)
        time.sleep(0.05)
        put(self, key, arr)
    ShardedSafetensorsWriter.put = slow_put
    phi_jax.PhiForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_save_leaves_the_old_checkpoint(make_checkpoint, sig):
    old, _ = make_checkpoint("phi1", fmt="sharded", seed=0)
    src, _ = make_checkpoint("phi1", seed=1)
    before, files = _ours(old), sorted(os.listdir(old))
    p = subprocess.Popen([sys.executable, "-c", _KILLED, src, old], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for _ in range(10):  # midway: 10 of 33 tensors written
        assert p.stdout.readline().startswith("tensor"), p.stderr.read()
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert sorted(os.listdir(old)) == files
    np.testing.assert_array_equal(_ours(old), before)
    np.testing.assert_allclose(_theirs(old), before, atol=1e-4 * before.std())
    model = phi_jax.PhiForCausalLM.from_pretrained(src)
    model.save_pretrained(old)  # a later save succeeds and removes what the killed one left
    assert not _leftovers(os.path.dirname(old))
    np.testing.assert_array_equal(_ours(old), np.asarray(model(jnp.asarray(IDS)).logits))


def test_relative_paths_everywhere(make_checkpoint, tmp_path, monkeypatch):
    src, ref = make_checkpoint("phi1")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = os.path.relpath(src)  # ../ckpt1
    model = phi_jax.PhiForCausalLM.from_pretrained(rel)
    model.save_pretrained("saved")
    convert.hf_to_orbax("saved", "orbax")
    from_orbax = phi_jax.PhiForCausalLM.from_pretrained("orbax")  # Orbax wants absolute paths: absolutised
    convert.orbax_to_hf("orbax", "hf")
    want = np.asarray(model(jnp.asarray(IDS)).logits)
    for path in ("saved", "orbax", "hf"):
        assert os.path.isdir(work / path)
    np.testing.assert_array_equal(np.asarray(from_orbax(jnp.asarray(IDS)).logits), want)
    np.testing.assert_array_equal(_ours("hf"), want)
    # saving into the working directory itself: the process stays in a live directory holding the new checkpoint
    monkeypatch.chdir(work / "hf")
    model.save_pretrained(".")
    assert os.getcwd() == str(work / "hf") and os.path.exists("config.json")
    np.testing.assert_array_equal(_ours("."), want)


def test_missing_directory_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: nope"):
        phi_jax.PhiForCausalLM.from_pretrained("nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        convert.hf_to_orbax("nope", "out")
    assert time.perf_counter() - start < 5 and not os.path.exists("out")


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_atomic_dir_without_exchange_and_after_a_cut_swap(tmp_path, monkeypatch):
    from phi_jax.io import atomic
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "weights").write_text("old")
    (dst / "tokenizer.json").write_text("tok")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a file system without renameat2
    with atomic.atomic_output_dir(dst, overwrite=True, keep=lambda name: name != "weights") as tmp:
        with open(os.path.join(tmp, "weights"), "w") as f:
            f.write("new")
    assert (dst / "weights").read_text() == "new" and (dst / "tokenizer.json").read_text() == "tok"
    assert not _leftovers(tmp_path)
    # a process killed between its two renames left the old directory aside and none in place: put back
    os.rename(dst, tmp_path / f".ckpt.old-{_dead_pid()}-0123abcd")
    with pytest.raises(FileExistsError):
        with atomic.atomic_output_dir(dst):
            pass
    assert (dst / "weights").read_text() == "new" and not _leftovers(tmp_path)
