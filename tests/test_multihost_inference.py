"""Inference on a mesh spanning two processes (joined by `jax.distributed.initialize` over gloo, 4 simulated CPU
devices each): `compiled()` logits, `generate` (greedy and sampled with per-row seeds) and `generate_stream` of a
model loaded with `from_pretrained(path, mesh=mesh)` equal the one-device run in this process. The tokens' rows live
on both processes' devices; every process gets all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from test_multihost import _free_port

ATTN = "pallas"  # the kernels per shard across processes (the xla path is covered by the train step's test)


def _inputs():
    ids = np.random.default_rng(0).integers(0, 96, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, :4] = 0  # left padding
    return ids, mask


def _run(model, logits_of):
    ids, mask = _inputs()
    return {"logits": logits_of(model, ids, mask).tolist(),
            "greedy": model.generate(ids, mask, max_new_tokens=5).tolist(),
            "sampled": model.generate(ids, mask, max_new_tokens=5, do_sample=True, seed=list(range(8))).tolist(),
            "stream": np.stack(list(model.generate_stream(ids, mask, max_new_tokens=4)), 1).tolist()}


def worker(path: str, coordinator: str, process_id: int) -> None:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from jax.experimental import multihost_utils

    from phi_jax import compiled, sharding
    from phi_jax.modeling.model import PhiForCausalLM

    def logits_of(model, ids, mask):
        return np.asarray(multihost_utils.process_allgather(compiled(model)(ids, mask).logits, tiled=True))
    model = PhiForCausalLM.from_pretrained(path, attn_implementation=ATTN, mesh=sharding.make_mesh(2, 2, 2))
    print("RESULT " + json.dumps(_run(model, logits_of)), flush=True)


def test_two_processes_infer_as_one_device(make_checkpoint, tmp_path):
    from conftest import rel_err
    from phi_jax import compiled
    from phi_jax.modeling.model import PhiForCausalLM
    path, _ = make_checkpoint("phi1", num_key_value_heads=2)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    coordinator = f"localhost:{_free_port()}"
    # output to files, not pipes: a process blocked on a full pipe while the other is read would stall both
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, path, coordinator, str(i)], env=env,
                              stdout=open(out, "w"), stderr=open(err, "w")) for i, (out, err) in enumerate(logs)]
    results = []
    for proc, (out, err) in zip(procs, logs):
        proc.wait(timeout=900)
        assert proc.returncode == 0, err.read_text()[-3000:]
        line = [ln for ln in out.read_text().splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[7:]))
    want = _run(PhiForCausalLM.from_pretrained(path, attn_implementation=ATTN),
                lambda model, ids, mask: np.asarray(compiled(model)(ids, mask).logits))
    for got in results:  # every process holds every row
        assert rel_err(np.asarray(got["logits"]), np.asarray(want["logits"])) <= 1e-5
        for kind in ("greedy", "sampled", "stream"):
            assert got[kind] == want[kind], kind


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
