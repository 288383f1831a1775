"""The core install (no torch, no transformers) and the persistent compilation cache, each in fresh processes.

Core install: a child process whose imports of torch and transformers fail (a meta-path finder, as if they
were not installed) loads a safetensors checkpoint, generates, converts to Orbax and back, and runs
`phi-jax generate`; `phi-jax check` and `phi-jax parity` stop with one line naming the extra to install.
Compilation cache: the same `phi-jax generate` run twice, each in a new process, compiles nothing the second
time (every program is loaded from the cache directory).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from phi_jax.parity import write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())
""")

_CORE = _BLOCK + textwrap.dedent("""
    import io, os, contextlib
    import numpy as np
    import phi_jax
    from phi_jax import convert
    from phi_jax.cli import main
    src, work = sys.argv[1:]
    try:
        import torch
    except ImportError:
        pass
    else:
        raise AssertionError("torch imported")
    model = phi_jax.PhiForCausalLM.from_pretrained(src)
    tokens = model.generate(np.array([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
    assert tokens.shape == (1, 7), tokens.shape
    convert.convert(src, os.path.join(work, "orbax"), to="orbax", progress=False)
    convert.convert(os.path.join(work, "orbax"), os.path.join(work, "hf"), to="hf", progress=False)
    again = phi_jax.PhiForCausalLM.from_pretrained(os.path.join(work, "hf"))
    assert (again.generate(np.array([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[]) == tokens).all()
    assert main(["generate", "--model", src, "--max-new-tokens", "3", "--no-compile-cache", "def f(x):"]) == 0
    assert main(["convert", "hf-to-orbax", src, os.path.join(work, "orbax2"), "--no-progress"]) == 0
    for argv in (["check", "--model", src], ["parity", "--layers", "1"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(argv) == 6, argv
        line, = err.getvalue().strip().splitlines()
        assert line.startswith("error: ") and "pip install 'phi_jax[parity]'" in line, line
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
    print("CORE OK")
""")


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def model_dir(make_checkpoint):
    d, _ = make_checkpoint("phi1", vocab_size=320, bos_token_id=0, eos_token_id=0)
    write_tokenizer(d, 320)
    return d


def test_core_install_needs_neither_torch_nor_transformers(model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-c", _CORE, model_dir, str(tmp_path)], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "CORE OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def _generate(model_dir, cache, env) -> str:
    r = subprocess.run([sys.executable, "-m", "phi_jax.cli", "generate", "--model", model_dir, "--max-new-tokens",
                        "4", "--compile-cache", str(cache), "def f(x):"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stderr.strip().splitlines()[-1]


def test_second_run_compiles_nothing(model_dir, tmp_path):
    env = _env()
    env.pop("PHI_JAX_COMPILE_CACHE", None)
    cache = tmp_path / "cache"
    first = _generate(model_dir, cache, env)
    compiled, loaded = map(int, re.search(r"(\d+) programs compiled, (\d+) loaded from the cache", first).groups())
    assert compiled >= 2 and loaded == 0, first
    assert len(os.listdir(cache)) >= compiled
    second = _generate(model_dir, cache, env)
    assert re.search(rf"0 programs compiled, {compiled} loaded from the cache", second), second


def test_cache_directory_choice(monkeypatch, tmp_path):
    from phi_jax.cli.common import cache_dir, default_cache_dir
    from argparse import Namespace
    args = Namespace(compile_cache=None, no_compile_cache=False)
    monkeypatch.delenv("PHI_JAX_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir(args) == default_cache_dir() == str(tmp_path / "phi_jax" / "jax-compilation-cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")
    assert cache_dir(args) == "/jax/own"
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "rel/dir")
    assert cache_dir(args) == os.path.abspath("rel/dir")
    monkeypatch.setenv("PHI_JAX_COMPILE_CACHE", "off")
    assert cache_dir(args) is None
    assert cache_dir(Namespace(compile_cache="x", no_compile_cache=False)) == os.path.abspath("x")
    assert cache_dir(Namespace(compile_cache=None, no_compile_cache=True)) is None
    assert cache_dir(Namespace(model="convert has no cache")) is None
