"""Shared fixtures: small random Phi checkpoints written by transformers itself.

`make_checkpoint(tmp_path, ...)` builds a transformers PyTorch Phi model with random
weights spread so that logits are a few units, LayerNorm weights and biases perturbed
(nothing is trivially 1 or 0), and writes it with transformers' own `save_pretrained`
(or `torch.save` for the `.bin` layout). It returns the directory and the torch model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PHI_JAX_COMPILE_CACHE", "off")  # in-process CLI tests must not write to ~/.cache

import numpy as np
import pytest

from phi_jax.parity import randomize  # noqa: F401  (re-exported for tests)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Small geometries of the released models (fewer layers, narrower).
GEOMETRIES = {
    # phi-1 / phi-1.5: head_dim 16 here, rotary 0.5
    "phi1": dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 partial_rotary_factor=0.5, max_position_embeddings=128),
    # phi-2: head_dim 80, rotary 0.4 -> 32 rotary channels
    "phi2": dict(vocab_size=96, hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
                 partial_rotary_factor=0.4, max_position_embeddings=128),
}

CLASSES = ("PhiModel", "PhiForCausalLM", "PhiForSequenceClassification", "PhiForTokenClassification")


def torch_config(geometry: str = "phi1", **overrides) -> "transformers.PhiConfig":
    kw = dict(GEOMETRIES[geometry])
    kw.update(overrides)
    return transformers.PhiConfig(**kw)


def write_checkpoint(directory, model, fmt: str = "safetensors", layout: str = "5.x") -> str:
    directory = os.fspath(directory)
    if fmt == "safetensors":
        model.save_pretrained(directory)
    elif fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    elif fmt == "bin":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    if layout == "4.x":  # rewrite config.json the way transformers 4.x wrote it
        p = os.path.join(directory, "config.json")
        with open(p) as f:
            d = json.load(f)
        rope = d.pop("rope_parameters")
        d["rope_theta"] = rope.pop("rope_theta")
        d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        rtype = rope.pop("rope_type")
        d["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rope}
        d["torch_dtype"] = d.pop("dtype", "float32")
        d["transformers_version"] = "4.37.0"
        with open(p, "w") as f:
            json.dump(d, f)
    return directory


@pytest.fixture
def make_checkpoint(tmp_path):
    counter = [0]

    def make(geometry="phi1", cls="PhiForCausalLM", fmt="safetensors", layout="5.x", seed=0, **overrides):
        counter[0] += 1
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(torch_config(geometry, **overrides)).eval()
        randomize(model, seed)
        d = write_checkpoint(tmp_path / f"ckpt{counter[0]}", model, fmt, layout)
        return d, model

    return make


def rel_err(out, ref) -> float:
    """max |out - ref| / std(ref)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.std(ref))


def run_on_cpu_devices(args: list[str], devices: int = 8, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python ARGS...` in a process with `devices` simulated CPU devices (the pytest process has one), phi_jax
    and tests/ importable; asserts it exits 0 and returns it (stdout captured)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
