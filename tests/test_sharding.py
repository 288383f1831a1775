"""Sharding on 8 simulated CPU devices (one subprocess: the main pytest process has a single device).

The worker loads a checkpoint onto meshes (8,1,1), (1,8,1), (2,2,2), (1,2,4): every parameter has the
PartitionSpec its logical axes give under the rules and is really split, logits equal the single-device run and
transformers; one train step on each mesh equals the single-device step.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))

# The logical axes of every parameter (layer numbers as N), as the sharding design wants them: input dimensions
# over `embed`, heads / MLP / vocabulary over theirs; LayerNorms and the output projections' biases (added to
# activations whose rows are split over the batch axes) replicated under `norm`.
AXES = {
    "model.embed_tokens.embedding": ("vocab", "embed"),
    "model.layers.N.input_layernorm.scale": ("norm",),
    "model.layers.N.input_layernorm.bias": ("norm",),
    "model.layers.N.self_attn.q_proj.kernel": ("embed", "heads"),
    "model.layers.N.self_attn.q_proj.bias": ("heads",),
    "model.layers.N.self_attn.k_proj.kernel": ("embed", "kv_heads"),
    "model.layers.N.self_attn.k_proj.bias": ("kv_heads",),
    "model.layers.N.self_attn.v_proj.kernel": ("embed", "kv_heads"),
    "model.layers.N.self_attn.v_proj.bias": ("kv_heads",),
    "model.layers.N.self_attn.dense.kernel": ("heads", "embed"),
    "model.layers.N.self_attn.dense.bias": ("norm",),
    "model.layers.N.self_attn.q_layernorm.scale": ("norm",),
    "model.layers.N.self_attn.q_layernorm.bias": ("norm",),
    "model.layers.N.self_attn.k_layernorm.scale": ("norm",),
    "model.layers.N.self_attn.k_layernorm.bias": ("norm",),
    "model.layers.N.mlp.fc1.kernel": ("embed", "mlp"),
    "model.layers.N.mlp.fc1.bias": ("mlp",),
    "model.layers.N.mlp.fc2.kernel": ("mlp", "embed"),
    "model.layers.N.mlp.fc2.bias": ("norm",),
    "model.final_layernorm.scale": ("norm",),
    "model.final_layernorm.bias": ("norm",),
    "lm_head.kernel": ("embed", "vocab"),
    "lm_head.bias": ("vocab",),
}


def expected_spec(names, shape, mesh_shape: dict) -> list:
    """Each logical name's mesh axis in DEFAULT_RULES where that axis is larger than 1 and divides the dimension."""
    from phi_jax.sharding import DEFAULT_RULES
    spec = []
    for name, size in zip(names, shape):
        axis = DEFAULT_RULES[name]
        assert axis is None or isinstance(axis, str), (name, axis)  # one mesh axis per name (else: extend this)
        spec.append(axis if axis is not None and mesh_shape[axis] > 1 and size % mesh_shape[axis] == 0 else None)
    return spec


def _spec_list(spec, ndim: int) -> list:
    """A PartitionSpec as a JSON list, one entry per dimension (single-axis tuples as the axis name)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [e[0] if isinstance(e, tuple) and len(e) == 1 else list(e) if isinstance(e, tuple) else e
            for e in entries]


def test_logical_rules_and_divisibility():
    import jax
    from phi_jax.sharding import DEFAULT_RULES, make_mesh, parse_mesh, spec_for
    from jax.sharding import PartitionSpec as P
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": None, "tensor": 4}  # fsdp: what is left
    assert parse_mesh(" fsdp = 2 ,data=1") == {"data": 1, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="bad mesh entry 'model=2'"):
        parse_mesh("model=2")
    with pytest.raises(ValueError, match="bad mesh entry 'data=0'"):
        parse_mesh("data=0")
    with pytest.raises(ValueError, match="mesh axis 'data' given twice"):
        parse_mesh("data=2,data=4")
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert spec_for(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    assert spec_for(("embed", "mlp"), (63, 256), mesh) == P(None, "tensor")  # 63 % 2: replicated
    assert spec_for(("norm",), (64,), mesh) == P(None)
    assert spec_for(("embed", "mlp"), (64, 256), mesh, {**DEFAULT_RULES, "mlp": ("tensor", "data")}) == \
        P("fsdp", ("tensor", "data"))
    with pytest.raises(ValueError, match="spans 8 devices, but there are 1: the sizes' product must equal"):
        make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match="data=2 x tensor=1 does not divide the 1 devices"):
        make_mesh(**parse_mesh("data=2"))
    four = [jax.devices()[0]] * 4  # the shape check only: make_mesh reshapes the list it is given
    assert dict(make_mesh(**parse_mesh("data=2"), devices=four).shape) == {"data": 2, "fsdp": 2, "tensor": 1}


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
    specs = {}
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        model = PhiForCausalLM.from_pretrained(path, mesh=mesh)
        specs[str(shape)] = {".".join(map(str, p)): (list(v.get_value().shape),
                                                     _spec_list(v.get_value().sharding.spec, v.get_value().ndim),
                                                     list(v.get_metadata().get("out_sharding") or ()))
                             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
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
    with open(out + ".specs.json", "w") as f:
        json.dump(specs, f)


def test_sharded_load_forward_and_step(make_checkpoint, tmp_path):
    import torch
    from conftest import rel_err
    path, tmodel = make_checkpoint("phi1", num_key_value_heads=2, qk_layernorm=True)
    out = tmp_path / "out.npz"
    from conftest import run_on_cpu_devices  # (not at the top: the worker process skips conftest's imports)
    run_on_cpu_devices([__file__, path, str(out)])
    specs = json.loads((tmp_path / "out.npz.specs.json").read_text())
    for shape in MESHES:  # every parameter's PartitionSpec, from its logical axes and the rules
        mesh_shape = dict(zip(("data", "fsdp", "tensor"), shape))
        got = specs[str(shape)]
        assert {re.sub(r"\.\d+\.", ".N.", k) for k in got} == set(AXES), shape
        for k, (dims, spec, names) in got.items():
            axes = AXES[re.sub(r"\.\d+\.", ".N.", k)]
            assert tuple(names) == axes, (k, names)  # heads and kv_heads both go to tensor: compare the names too
            assert spec == expected_spec(axes, dims, mesh_shape), (shape, k, spec)
    # written out for two meshes: phi1 here is D 64, 4 heads x 16 (q, dense), 2 kv heads x 16, F 256, V 96
    want = {(1, 2, 4): {"embedding": ["tensor", "fsdp"], "q_proj.kernel": ["fsdp", "tensor"],
                        "k_proj.kernel": ["fsdp", "tensor"], "k_proj.bias": ["tensor"],
                        "dense.kernel": ["tensor", "fsdp"], "dense.bias": [None], "fc1.kernel": ["fsdp", "tensor"],
                        "fc2.kernel": ["tensor", "fsdp"], "lm_head.kernel": ["fsdp", "tensor"],
                        "lm_head.bias": ["tensor"], "final_layernorm.scale": [None]},
            (8, 1, 1): {"embedding": [None, None], "fc1.kernel": [None, None], "lm_head.bias": [None]}}
    for shape, table in want.items():
        for suffix, spec in table.items():
            (k,) = [k for k in specs[str(shape)] if k.endswith(suffix) and ".layers.1." not in k]
            assert specs[str(shape)][k][1] == spec, (shape, k)
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
    from conftest import run_on_cpu_devices
    r = run_on_cpu_devices(["-c", _LOAD, str(src), str(small)], timeout=600)
    grow = json.loads(r.stdout.strip().splitlines()[-1])["grow"]
    assert 0.9 * size <= grow <= size + 2 * largest, (grow, size)
