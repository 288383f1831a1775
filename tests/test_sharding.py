"""Sharding on 8 simulated CPU devices (one subprocess: the main pytest process has a single device).

The worker loads a checkpoint onto meshes (8,1,1), (1,8,1), (2,2,2), (1,2,4): parameters are really split,
logits equal the single-device run and transformers; one train step on the (2,2,2) mesh equals
the single-device step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))


def test_logical_rules_and_divisibility():
    import jax
    from phi_jax.sharding import DEFAULT_RULES, make_mesh, parse_mesh, spec_for
    from jax.sharding import PartitionSpec as P
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="bad mesh entry 'model=2'"):
        parse_mesh("model=2")
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert spec_for(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    assert spec_for(("embed", "mlp"), (63, 256), mesh) == P(None, "tensor")  # 63 % 2: replicated
    assert spec_for(("norm",), (64,), mesh) == P(None)
    assert spec_for(("embed", "mlp"), (64, 256), mesh, {**DEFAULT_RULES, "mlp": ("tensor", "data")}) == \
        P("fsdp", ("tensor", "data"))
    with pytest.raises(ValueError, match="needs 8 devices, have 1"):
        make_mesh(2, 2, 2)


def worker(path: str, out: str) -> None:
    """Runs in a process with 8 CPU devices; writes logits, losses and parameters to `out` (npz)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax import sharding
    from phi_jax.modeling.model import PhiForCausalLM
    from phi_jax.train.loop import build
    from phi_jax.train.step import TrainConfig, make_optimizer, split_model

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (8, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
             "position_ids": np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape).copy()}
    results = {"ids": ids}
    forward = nnx.jit(lambda m, x: m(x).logits)
    # eps=1: the first AdamW step is then about lr * grad, not lr * sign(grad), which noise-level gradients
    # (a key bias's, exactly zero in exact arithmetic) would flip between any two reduction orders
    tx = make_optimizer(TrainConfig(learning_rate=1e-2, total_steps=10, eps=1.0))

    def train_step(model, mesh):
        state, frozen, step_fn, batch_sh = build(split_model(model), tx, mesh)
        placed = {k: sharding.place(v, batch_sh) for k, v in batch.items()}
        state, metrics = step_fn(state, frozen, placed, None)
        return float(metrics["loss"]), {k: np.asarray(v) for k, v in state["params"].items()}

    single = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = PhiForCausalLM.from_pretrained(path)
    results["logits_single"] = np.asarray(forward(model, ids))
    results["loss_single"], params = train_step(model, single)
    for k, v in params.items():
        results[f"single/{k}"] = v
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        model = PhiForCausalLM.from_pretrained(path, mesh=mesh)
        fc1 = model.model.layers[0].mlp.fc1.kernel[...]
        # really split: no device holds the whole kernel unless both its axes are size 1 on this mesh
        shard = fc1.addressable_shards[0].data.shape
        assert fc1.sharding.spec == sharding.spec_for(("embed", "mlp"), fc1.shape, mesh), fc1.sharding
        assert np.prod(shard) * shape[1] * shape[2] == np.prod(fc1.shape), (shape, shard)
        with jax.set_mesh(mesh):
            results[f"logits_{shape}"] = np.asarray(forward(model, ids))
        results[f"loss_{shape}"], params = train_step(model, mesh)
        for k, v in params.items():
            results[f"{shape}/{k}"] = v
    np.savez(out, **results)


def test_sharded_load_forward_and_step(make_checkpoint, tmp_path):
    import torch
    from conftest import rel_err
    path, tmodel = make_checkpoint("phi1", num_key_value_heads=2)
    out = tmp_path / "out.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__)])}
    proc = subprocess.run([sys.executable, __file__, path, str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = np.load(out)
    with torch.no_grad():
        ref = tmodel(torch.tensor(r["ids"], dtype=torch.long)).logits.numpy()
    assert rel_err(r["logits_single"], ref) <= 1e-4
    names = [k.split("/", 1)[1] for k in r.files if k.startswith("single/")]
    for shape in MESHES:
        assert rel_err(r[f"logits_{shape}"], ref) <= 1e-4, shape
        assert rel_err(r[f"logits_{shape}"], r["logits_single"]) <= 1e-5, shape
    for shape in MESHES:  # one train step on each mesh equals the single-device step
        assert abs(float(r[f"loss_{shape}"]) - float(r["loss_single"])) <= 1e-5 * float(r["loss_single"]), shape
        for k in names:
            np.testing.assert_allclose(r[f"{shape}/{k}"], r[f"single/{k}"], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{shape} {k}")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])


_LOAD = """
import json, sys
import jax
from phi_jax import sharding
from phi_jax.modeling.model import PhiForCausalLM

def status(field):  # kB -> bytes; VmHWM is the peak resident set since the last reset
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

mesh = sharding.make_mesh(1, 8, 1)
PhiForCausalLM.from_pretrained(sys.argv[2], mesh=mesh)  # warm-up: imports, tracing machinery
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
model = PhiForCausalLM.from_pretrained(sys.argv[1], mesh=mesh)
kernel = model.model.layers[0].mlp.fc1.kernel[...]
assert len({s.device for s in kernel.addressable_shards}) == 8 and kernel.addressable_shards[0].data.shape[0] * 8 \\
    == kernel.shape[0]
print(json.dumps({"grow": status("VmHWM") - base}))
"""


def test_sharded_load_holds_one_copy(tmp_path):
    """On 8 CPU devices with fsdp=8, device memory is host memory: a sharded load grows by the model's size
    (its slices) plus about one tensor; a full replica per device would be 8 copies."""
    import json

    from phi_jax import convert
    from phi_jax.config import PhiConfig
    cfg = PhiConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                    num_attention_heads=8)
    src = convert.write_random_hf(tmp_path / "big", cfg)
    small = convert.write_random_hf(tmp_path / "small", cfg.replace(vocab_size=64, hidden_size=64,
                                                                     intermediate_size=64, num_hidden_layers=1))
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    largest = 8192 * 512 * 4
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    r = subprocess.run([sys.executable, "-c", _LOAD, str(src), str(small)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    grow = json.loads(r.stdout.strip().splitlines()[-1])["grow"]
    assert 0.9 * size <= grow <= size + 2 * largest, (grow, size)
