"""Multi-host for real on one machine: two processes joined by `jax.distributed.initialize` (gloo CPU
collectives), 4 simulated devices each, run sharded training with a checkpoint save and restore; the losses
equal the single-process run on 8 devices, with the xla attention and with the pallas kernels run per shard."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from train_fixtures import TEXT, write_char_tokenizer, write_jsonl

STEPS = 4


def worker(model: str, data: str, output: str, coordinator: str | None, process_id: int, attn: str) -> None:
    import jax
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    assert jax.device_count() == 8, jax.device_count()
    from jax.experimental import multihost_utils

    from phi_jax.train.loop import RunConfig, finetune
    from phi_jax.train.step import TrainConfig
    run = dict(model=model, data=data, output=output, steps=STEPS, batch_size=4, seq_len=16, save_every=2, keep=5,
               mesh="data=2,fsdp=2,tensor=2", progress=False, attn_implementation=attn,
               train=TrainConfig(learning_rate=1e-2, warmup_steps=1))
    losses = finetune(RunConfig(**run))["losses"]  # exports OUTPUT/model (gathered across processes)
    # restore: drop the final checkpoint, resume from step 2 and recompute steps 3 and 4
    multihost_utils.sync_global_devices("before delete")
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(output, "checkpoints", str(STEPS)))
    multihost_utils.sync_global_devices("after delete")
    resumed = finetune(RunConfig(**run, resume=True, export=False))["losses"]
    print("RESULT " + json.dumps({"losses": losses, "resumed": resumed}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("attn", ["xla", "pallas"])  # pallas: the kernels per shard (shard_map) across processes
def test_two_processes_match_one(make_checkpoint, tmp_path, attn):
    path, _ = make_checkpoint("phi1", num_hidden_layers=1, intermediate_size=128)
    write_char_tokenizer(path, 96)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": TEXT * 2}] * 6)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}

    def launch(devices, output, coordinator="", pid=0):
        e = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        return subprocess.Popen([sys.executable, __file__, path, data, str(output), coordinator, str(pid), attn], env=e,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(proc):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        return {k: {int(s): v for s, v in d.items()} for k, d in json.loads(line[7:]).items()}

    coordinator = f"localhost:{_free_port()}"
    procs = [launch(4, tmp_path / "multi", coordinator, i) for i in range(2)] + [launch(8, tmp_path / "single")]
    *multi, single = [result(p) for p in procs]
    assert sorted(single["losses"]) == list(range(1, STEPS + 1))
    assert single["resumed"] == single["losses"]
    for r in multi:
        # gloo's all-reduce adds in another order than one process does: float32 rounding, no more
        assert all(abs(r["losses"][s] - v) <= 1e-5 * v for s, v in single["losses"].items()), r
        assert r["resumed"] == r["losses"]  # the restored run continues exactly
    # the export gathered across processes: the same model as the one-process export (parameters may differ at
    # noise level where a gradient is zero in exact arithmetic, as the key bias's, which no logit depends on)
    import jax.numpy as jnp
    from conftest import rel_err
    from phi_jax.modeling.model import PhiForCausalLM
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 16)), jnp.int32)
    multi_logits = PhiForCausalLM.from_pretrained(tmp_path / "multi" / "model")(ids).logits
    single_logits = PhiForCausalLM.from_pretrained(tmp_path / "single" / "model")(ids).logits
    assert rel_err(multi_logits, single_logits) <= 1e-4

if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None, int(sys.argv[5]), sys.argv[6])
