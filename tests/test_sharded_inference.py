"""Inference on a mesh (8 simulated CPU devices, in a subprocess): a model loaded with `from_pretrained(path,
mesh=mesh)` runs `compiled()` and `generate` under `phi_jax.sharding.layout_of`. Rows split over the batch axes,
the pallas attention runs per shard (no device gathers the batch's q, k, v), the embedding lookup is per device;
logits and tokens equal the single-device run; rules the caller put in force are kept."""

from __future__ import annotations

import re
import sys

import numpy as np


def _gathered_activations(text: str, batch: int) -> list[str]:
    """Result shapes of the all-gathers in HLO `text` that are whole-batch activations (rank >= 3, leading dim
    `batch`); the weights' FSDP gathers are rank 1 or 2."""
    shapes = re.findall(r"= \w+\[([\d,]+)\][^=]*? all-gather(?:-start)?\(", text)
    return [s for s in shapes if len(s.split(",")) >= 3 and s.split(",")[0] == str(batch)]


def worker(path: str, out: str) -> None:
    import jax

    import importlib

    from phi_jax import sharding
    from phi_jax.compilation import split_cached
    from phi_jax.modeling.model import PhiForCausalLM, PhiForSequenceClassification

    compiled_module = importlib.import_module("phi_jax.compiled")  # (the package rebinds `phi_jax.compiled`)
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    results = {}
    single = PhiForCausalLM.from_pretrained(path, attn_implementation="pallas")
    mesh = sharding.make_mesh(2, 2, 2)
    model = PhiForCausalLM.from_pretrained(path, attn_implementation="pallas", mesh=mesh)
    results["logits_single"] = np.asarray(compiled_module.compiled(single)(ids, mask).logits)
    logits = compiled_module.compiled(model)(ids, mask).logits
    results["logits_mesh"] = np.asarray(logits)
    results["rows_split"] = logits.sharding.spec[0] == ("data", "fsdp")
    static, leaves = split_cached(model)

    def program_text(layout):
        return compiled_module._apply.lower(static, leaves, ids, mask, None, None, False,
                                            layout=layout).compile().as_text()
    results["gathers"] = len(_gathered_activations(program_text(sharding.layout_of(leaves)), 8))
    results["gathers_without_rules"] = len(_gathered_activations(program_text(None), 8))
    # a classifier's state begins with RNG counts and keys, which stay on one device: its weights are looked at
    classifier = PhiForSequenceClassification.from_pretrained(path, mesh=mesh, allow_new_head=True)
    results["classifier_layout"] = sharding.layout_of(split_cached(classifier)[1]) is not None
    with sharding.rules_in_force(mesh, {**sharding.DEFAULT_RULES, "batch": None}):  # the caller's rules win
        results["caller_rules_rows"] = str(compiled_module.compiled(model)(ids, mask).logits.sharding.spec[0])
    for name, m in (("single", single), ("mesh", model)):
        results[f"gen_{name}"] = m.generate(ids, mask, max_new_tokens=6)
        results[f"sample_{name}"] = m.generate(ids[:2], mask[:2], max_new_tokens=5, do_sample=True, seed=[3, 4])
        results[f"stream_{name}"] = np.stack(list(m.generate_stream(ids[:1], mask[:1], max_new_tokens=5)), 1)
    np.savez(out, **results)


def test_inference_on_a_mesh(make_checkpoint, tmp_path):
    import torch
    path, tmodel = make_checkpoint("phi1", num_key_value_heads=2)
    out = tmp_path / "out.npz"
    from conftest import rel_err, run_on_cpu_devices  # (not at the top: the worker process skips conftest's imports)
    run_on_cpu_devices([__file__, path, str(out)])
    r = np.load(out)
    assert rel_err(r["logits_mesh"], r["logits_single"]) <= 1e-5
    ids, mask = (np.ones((8, 12), np.int64) for _ in range(2))
    ids[:] = np.random.default_rng(0).integers(0, 96, (8, 12))
    mask[1, :5] = 0
    with torch.no_grad():  # transformers' logits at the real positions, on the weights it wrote
        ref = tmodel(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    assert rel_err(r["logits_mesh"][real], ref[real]) <= 1e-4
    assert r["rows_split"]
    assert r["gathers"] == 0
    assert r["gathers_without_rules"] > 0  # what the rules prevent: the batch's activations gathered whole
    assert str(r["caller_rules_rows"]) == "None"
    assert r["classifier_layout"]
    for kind in ("gen", "sample", "stream"):
        np.testing.assert_array_equal(r[f"{kind}_mesh"], r[f"{kind}_single"], err_msg=kind)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
