"""Checkpoint I/O review: bad inputs a user meets with a local phi-2 download, and what loading, saving and converting
do with them (one clear error naming the culprit, nothing partial left behind, nothing touched outside the output)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
import transformers
from conftest import torch_config, write_checkpoint
from safetensors.numpy import load_file
from test_loading import _edit_safetensors

import phi_jax
from phi_jax import convert
from phi_jax.cli import main as cli_main
from phi_jax.config import PhiConfig
from phi_jax.parity import randomize

FC1 = "model.layers.0.mlp.fc1.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny random Phi written by transformers as model.safetensors and as pytorch_model.bin."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(torch_config("phi1")).eval()
    randomize(model, 0)
    return {fmt: write_checkpoint(root / fmt, model, fmt) for fmt in ("safetensors", "bin")}


@pytest.fixture
def ckpt(base, tmp_path):
    """A fresh copy of a base checkpoint: `ckpt('safetensors')` or `ckpt('bin')`."""
    def copy(fmt="safetensors"):
        return shutil.copytree(base[fmt], tmp_path / f"src-{fmt}", symlinks=True)
    return copy


def _edit_bin(d, fn):
    path = os.path.join(d, "pytorch_model.bin")
    state = torch.load(path, weights_only=True)
    state = fn(state) or state
    torch.save(state, path)


def _cli(*args) -> int:
    return cli_main([*map(str, args)])


# ---- weights of a dtype that is not a floating point weight --------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.uint8])
def test_integer_or_bool_weight_is_refused_naming_tensor_dtype_and_file(ckpt, tmp_path, capsys, dtype):
    src = ckpt()
    _edit_safetensors(src, lambda t: t.__setitem__(FC1, t[FC1].astype(dtype)))
    name = np.dtype(dtype).name
    pattern = rf"{FC1}.*model\.safetensors.*{name}"
    with pytest.raises(ValueError, match=pattern):
        phi_jax.PhiForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match=pattern):
        convert.hf_to_orbax(src, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    assert _cli("convert", "hf-to-orbax", src, tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and FC1 in err and name in err


def test_integer_weight_in_a_bin_file_is_refused(ckpt):
    src = ckpt("bin")
    _edit_bin(src, lambda s: s.__setitem__(FC1, s[FC1].to(torch.int32)))
    with pytest.raises(ValueError, match=rf"{FC1}.*pytorch_model\.bin.*int32"):
        phi_jax.PhiForCausalLM.from_pretrained(src)


def test_float64_and_float16_weights_still_load(ckpt):
    src = ckpt()
    ref = load_file(os.path.join(src, "model.safetensors"))[FC1]
    _edit_safetensors(src, lambda t: t.update({FC1: t[FC1].astype(np.float64),
                                               "lm_head.bias": t["lm_head.bias"].astype(np.float16)}))
    model = phi_jax.PhiForCausalLM.from_pretrained(src)
    np.testing.assert_array_equal(np.asarray(model.model.layers[0].mlp.fc1.kernel[...]), ref.T)


def _rewrite_header(path, fn):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    with open(path, "wb") as f:
        f.write(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


@pytest.mark.parametrize("code,itemsize", [("F8_E4M3", 1), ("U16", 2)])
def test_safetensors_dtype_phi_jax_cannot_read_is_named(ckpt, capsys, code, itemsize):
    src = ckpt()

    def to(header):
        begin, end = header[FC1]["data_offsets"]
        header[FC1].update(dtype=code, shape=[(end - begin) // itemsize])

    _rewrite_header(os.path.join(src, "model.safetensors"), to)
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{FC1}' has dtype {code}") as e:
        phi_jax.PhiForCausalLM.from_pretrained(src)
    assert "corrupt" not in str(e.value)


def test_bin_float8_weight_is_a_value_error_not_a_crash(ckpt, tmp_path, capsys):
    src = ckpt("bin")
    _edit_bin(src, lambda s: s.__setitem__(FC1, s[FC1].to(torch.float8_e4m3fn)))
    with pytest.raises(ValueError, match=rf"pytorch_model\.bin.*{FC1}.*float8_e4m3fn"):
        phi_jax.PhiForCausalLM.from_pretrained(src)
    assert _cli("convert", "hf-to-orbax", src, tmp_path / "out", "--no-progress") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("edit,culprit", [
    (lambda s: {"state_dict": s}, "'state_dict'.*dict"),  # a training checkpoint, the weights one level down
    (lambda s: {**s, "step": 3}, "'step'.*int"),
])
def test_bin_holding_something_other_than_tensors_names_the_entry(ckpt, capsys, edit, culprit):
    src = ckpt("bin")
    _edit_bin(src, edit)
    with pytest.raises(ValueError, match=rf"pytorch_model\.bin.*{culprit}"):
        phi_jax.PhiForCausalLM.from_pretrained(src)
    assert _cli("convert", "hf-to-orbax", src, os.path.join(src, "..", "out"), "--no-progress") == 2
    assert "Traceback" not in capsys.readouterr().err


# ---- outputs ---------------------------------------------------------------------------------------------------------

def test_failed_convert_removes_the_parent_directories_it_created(ckpt, tmp_path, monkeypatch, capsys):
    src = ckpt()
    before = sorted(os.listdir(tmp_path))

    def disk_full(self, key, rows=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.HFSource, "get", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert.convert(src, tmp_path / "a" / "b" / "out", to="hf")
    assert sorted(os.listdir(tmp_path)) == before
    assert _cli("convert", "hf-to-orbax", src, tmp_path / "x" / "y" / "out", "--no-progress") == 5
    assert sorted(os.listdir(tmp_path)) == before
    # a parent that existed before stays, even when empty
    os.mkdir(tmp_path / "kept")
    with pytest.raises(OSError):
        convert.convert(src, tmp_path / "kept" / "new" / "out", to="hf")
    assert os.listdir(tmp_path / "kept") == []


def test_tilde_paths_mean_the_home_directory(ckpt, tmp_path, monkeypatch):
    src = ckpt()
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    shutil.copytree(src, home / "phi")
    model = phi_jax.PhiForCausalLM.from_pretrained("~/phi")
    model.save_pretrained("~/saved")
    convert.hf_to_orbax("~/saved", "~/orbax")
    assert _cli("convert", "orbax-to-hf", "~/orbax", "~/hf", "--no-progress") == 0
    assert not os.path.exists(work / "~")
    assert {"phi", "saved", "orbax", "hf"} <= set(os.listdir(home))
    a, b = load_file(str(home / "hf" / "model.safetensors")), load_file(os.path.join(src, "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_convert_refuses_to_replace_a_directory_holding_its_source(ckpt, tmp_path):
    parent = tmp_path / "parent"
    src = shutil.copytree(ckpt(), parent / "phi")
    with pytest.raises(ValueError, match="inside"):
        convert.convert(src, parent, to="orbax", overwrite=True)
    assert os.listdir(src) and os.path.isfile(os.path.join(src, "model.safetensors"))


@pytest.mark.parametrize("dtype", ["int8", np.int32, np.bool_])
def test_save_and_convert_refuse_a_dtype_that_is_not_floating(ckpt, tmp_path, dtype):
    src = ckpt()
    model = phi_jax.PhiForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match="dtype"):
        model.save_pretrained(tmp_path / "saved", dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        convert.convert(src, tmp_path / "conv", to="hf", dtype=dtype)
    assert not os.path.exists(tmp_path / "saved") and not os.path.exists(tmp_path / "conv")


# ---- config.json -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rope,culprit", [
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": "32"}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "64"},
     "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, "truncate"),
    ({"rope_type": "llama3", "factor": 2.0, "low_freq_factor": None, "high_freq_factor": 4.0}, "low_freq_factor"),
    ({"rope_type": "longrope", "short_factor": ["1"] * 4, "long_factor": [1.0] * 4}, "short_factor"),
])
def test_rope_parameters_of_the_wrong_type_are_named(rope, culprit):
    d = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, **rope})
    with pytest.raises(ValueError, match=culprit):
        PhiConfig.from_dict(d)


def test_valid_rope_parameters_still_pass():
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    for rope in ({"rope_type": "yarn", "factor": 2, "beta_fast": 32, "beta_slow": 1, "attention_factor": None,
                  "truncate": False, "original_max_position_embeddings": 64},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4.0},
                 {"rope_type": "longrope", "short_factor": [1, 1.5, 2, 2], "long_factor": [1.0] * 4}):
        PhiConfig.from_dict({**common, "rope_parameters": rope})


# ---- symlinks --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_broken_symlink_is_named_with_its_target(ckpt, tmp_path, capsys, name):
    """A Hugging Face cache snapshot copied without its blobs: every file a symlink to ../../blobs/..."""
    src = ckpt()
    os.remove(os.path.join(src, name))
    os.symlink("../../blobs/0123abcd", os.path.join(src, name))
    with pytest.raises(FileNotFoundError, match=rf"{name}.*broken symlink.*blobs/0123abcd"):
        phi_jax.PhiForCausalLM.from_pretrained(src)
    assert _cli("convert", "hf-to-orbax", src, tmp_path / "out", "--no-progress") == 3
    assert "broken symlink" in capsys.readouterr().err


def test_symlinked_files_and_directory_load(ckpt, tmp_path):
    src = ckpt()
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for name in os.listdir(src):
        shutil.move(os.path.join(src, name), blobs / name)
        os.symlink(os.path.relpath(blobs / name, snap), snap / name)
    os.symlink(snap, tmp_path / "link")
    model = phi_jax.PhiForCausalLM.from_pretrained(tmp_path / "link")
    ref = load_file(str(blobs / "model.safetensors"))[FC1]
    np.testing.assert_array_equal(np.asarray(model.model.layers[0].mlp.fc1.kernel[...]), ref.T)


# ---- pytorch_model.bin: the operating system's errors stay theirs ----------------------------------------------------

def test_bin_permission_denied_is_an_os_error_and_empty_bin_says_empty(ckpt, tmp_path, monkeypatch, capsys):
    src = ckpt("bin")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    with monkeypatch.context() as m:
        m.setattr(torch, "load", denied)
        with pytest.raises(PermissionError):
            phi_jax.PhiForCausalLM.from_pretrained(src)
        assert _cli("convert", "hf-to-orbax", src, tmp_path / "out", "--no-progress") == 5
    assert "Permission denied" in capsys.readouterr().err
    open(os.path.join(src, "pytorch_model.bin"), "w").close()
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is empty"):
        phi_jax.PhiForCausalLM.from_pretrained(src)


# ---- Orbax directories ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's event loop, on its error
def test_damaged_orbax_data_names_one_tensor_in_one_short_line(ckpt, tmp_path, capsys):
    src = ckpt()
    orbax_dir = tmp_path / "orbax"
    convert.hf_to_orbax(src, orbax_dir)
    data = [os.path.join(r, f) for r, _, files in os.walk(orbax_dir / "params" / "state") for f in files
            if os.sep + "ocdbt.process_" in r and os.path.basename(r) == "d"]
    assert data
    for f in data:
        os.truncate(f, 10)
    with pytest.raises(ValueError, match=r"cannot read tensor [\w/]+ from .*params/state") as e:
        phi_jax.PhiForCausalLM.from_pretrained(orbax_dir)
    message = str(e.value)
    assert "tensorstore_spec" not in message and "\n" not in message and len(message) < 800, message
    assert _cli("convert", "orbax-to-hf", orbax_dir, tmp_path / "hf", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "tensorstore_spec" not in err.splitlines()[-1] and not os.path.exists(tmp_path / "hf")


# ---- Microsoft's layouts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", [[1], "parallel", {"mlp": "fused_mlp"}, {"mixer": ["x"]}])
def test_legacy_architecture_of_the_wrong_type_is_named(architecture):
    from phi_jax.io.legacy import legacy_config
    d = {"model_type": "mixformer-sequential", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 96,
         "architecture": architecture}
    with pytest.raises(ValueError, match=r"config\.json: architecture="):
        legacy_config(d, "config.json")


def test_save_syncs_every_file_before_publishing_the_directory(ckpt, tmp_path, monkeypatch):
    """A crash (power loss) after the rename must not find a config.json the kernel never wrote."""
    model = phi_jax.PhiForCausalLM.from_pretrained(ckpt())
    events, fsync, rename = [], os.fsync, os.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(a, b):
        events.append(("rename", os.fspath(b)))
        rename(a, b)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    model.save_pretrained(tmp_path / "saved")
    published = events.index(("rename", str(tmp_path / "saved")))
    synced = {os.path.basename(p) for kind, p in events[:published] if kind == "fsync"}
    assert {"config.json", "model.safetensors"} <= synced and any(".saved.partial-" in n for n in synced), events
