"""The fused attention implementations on a mesh (8 simulated CPU devices, in a subprocess): "pallas" runs per
shard (`modeling.partitioning.per_shard_attention`), so no device gathers the batch's q, k and v; values and
gradients equal the reference; a sharded train step with "pallas" equals the single-device one."""

from __future__ import annotations

import re
import sys

import numpy as np


def worker(path: str, out: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from phi_jax import sharding
    from phi_jax.kernels.reference import attention_reference
    from phi_jax.modeling.attention import get_attention_fn
    from phi_jax.modeling.mask import make_attention_mask
    from phi_jax.modeling.model import PhiForCausalLM
    from phi_jax.train.loop import build
    from phi_jax.train.step import TrainConfig, make_optimizer, split_model

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    results = {}
    q = jnp.asarray(rng.standard_normal((8, 40, 4, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((8, 40, 2, 64)), jnp.float32) for _ in range(2))
    ids = np.ones((8, 40), np.int32)
    ids[1, :7] = 0  # left padding: fully masked queries
    ids[5, 30:] = 0  # right padding
    ids[6, 20:] = 2  # two packed documents
    want = attention_reference(q, k, v, **make_attention_mask(jnp.asarray(ids), 40).kernel_kwargs())
    want_g = jax.grad(lambda q, k, v: jnp.sum(attention_reference(
        q, k, v, **make_attention_mask(jnp.asarray(ids), 40).kernel_kwargs()) ** 2), argnums=(0, 1, 2))(q, k, v)
    fn = get_attention_fn("pallas")
    # rows over data and fsdp; heads over tensor, except on (1, 2, 4) where the 2 key heads cannot split 4 ways
    for shape, spec in (((2, 2, 2), P(("data", "fsdp"), None, "tensor")), ((1, 2, 4), P("fsdp"))):
        mesh = sharding.make_mesh(*shape)

        def attend(q, k, v, ids):
            with sharding.rules_in_force(mesh):
                return fn(q, k, v, make_attention_mask(ids, q.shape[1]))
        rows = NamedSharding(mesh, P(("data", "fsdp")))
        args = [jax.device_put(x, rows) for x in (q, k, v, jnp.asarray(ids))]
        fwd = jax.jit(attend)
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2)))
        for name, f in (("fwd", fwd), ("grad", grad)):
            text = f.lower(*args).compile().as_text()
            results[f"{shape}/{name}_gathers"] = len(re.findall(r"all-gather", text))
        got = fwd(*args)
        results[f"{shape}/spec_ok"] = got.sharding.is_equivalent_to(NamedSharding(mesh, spec), got.ndim)
        results[f"{shape}/out_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        results[f"{shape}/grad_err"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                                           for a, b in zip(grad(*args), want_g))

    tokens = rng.integers(0, 96, (8, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[2, :3] = 0
    batch = {"input_ids": tokens, "attention_mask": mask, "labels": np.where(mask == 1, tokens, -100),
             "position_ids": np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape).copy()}
    tx = make_optimizer(TrainConfig(learning_rate=1e-2, total_steps=10, eps=1.0))
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        model = PhiForCausalLM.from_pretrained(path, attn_implementation="pallas")
        state, frozen, step_fn, batch_sh = build(split_model(model), tx, mesh)
        state, metrics = step_fn(state, frozen, {k: sharding.place(v, batch_sh) for k, v in batch.items()}, None)
        results[f"step{shape}/loss"] = float(metrics["loss"])
        for name, value in state["params"].items():
            results[f"step{shape}/{name}"] = np.asarray(value)
    np.savez(out, **results)


def test_pallas_runs_per_shard(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("phi1", num_key_value_heads=2)
    out = tmp_path / "out.npz"
    from conftest import run_on_cpu_devices  # (not at the top: the worker process skips conftest's imports)
    run_on_cpu_devices([__file__, path, str(out)])
    r = np.load(out)
    for shape in ((2, 2, 2), (1, 2, 4)):
        assert r[f"{shape}/fwd_gathers"] == 0 and r[f"{shape}/grad_gathers"] == 0, shape
        assert r[f"{shape}/spec_ok"], shape
        assert r[f"{shape}/out_err"] <= 2e-5 and r[f"{shape}/grad_err"] <= 2e-5, shape
    single, sharded = "step(1, 1, 1)", "step(2, 2, 2)"
    assert abs(float(r[f"{sharded}/loss"]) - float(r[f"{single}/loss"])) <= 1e-5 * float(r[f"{single}/loss"])
    names = [k.split("/", 1)[1] for k in r.files if k.startswith(single + "/") and k != single + "/loss"]
    assert len(names) > 10
    for name in names:
        np.testing.assert_allclose(r[f"{sharded}/{name}"], r[f"{single}/{name}"], rtol=1e-5, atol=1e-7, err_msg=name)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
