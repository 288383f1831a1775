"""Parity between phi_jax and transformers' PyTorch Phi on the same weights (needs torch).

`random_checkpoint` writes a random-weight transformers Phi with `save_pretrained`;
`compare` runs both implementations on the same inputs and reports the errors and timings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


def randomize(model, seed: int = 0) -> None:
    """Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases ~ 0.1 N, LayerNorm weight 1 + 0.2 N, bias 0.2 N.

    Logits come out at a few units and no parameter is trivially 0 or 1, so every one matters.
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def random_checkpoint(directory: str, seed: int = 0, **config_kwargs):
    """Writes a random transformers PhiForCausalLM to `directory`; returns the torch model (eval mode)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**config_kwargs)).eval()
    randomize(model, seed)
    model.save_pretrained(directory)
    return model


@dataclass
class ParityReport:
    max_rel_err: float  # max |jax - torch| / std(torch) over real positions
    mean_rel_err: float  # mean |jax - torch| / std(torch)
    top1_agreement: float
    jax_seconds: float  # compiled forward, median of `repeats`, compilation excluded
    torch_seconds: float
    compile_seconds: float

    def lines(self) -> list[str]:
        return [
            f"max relative logit error : {self.max_rel_err:.3e}  (max |jax - torch| / std(torch))",
            f"mean relative logit error: {self.mean_rel_err:.3e}",
            f"top-1 agreement          : {100 * self.top1_agreement:.2f}%",
            f"forward time, phi_jax    : {1e3 * self.jax_seconds:.1f} ms  (compile {self.compile_seconds:.1f} s)",
            f"forward time, transformers: {1e3 * self.torch_seconds:.1f} ms",
            f"speed-up                 : {self.torch_seconds / self.jax_seconds:.2f}x",
        ]


def compare(jax_model, torch_model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
            repeats: int = 3) -> ParityReport:
    """Runs both models on `input_ids: [B, T]` and compares logits at real positions."""
    import jax
    import jax.numpy as jnp
    import torch

    from phi_jax.compiled import compiled

    fwd = compiled(jax_model)
    ids, mask = jnp.asarray(input_ids), None if attention_mask is None else jnp.asarray(attention_mask)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(ids, mask).logits)
    compile_s = time.perf_counter() - t0
    jax_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(ids, mask).logits)
        jax_times.append(time.perf_counter() - t0)
    t_ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    t_mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, np.int64))
    torch_times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            ref = torch_model(t_ids, attention_mask=t_mask).logits
            torch_times.append(time.perf_counter() - t0)
    ref = ref.float().numpy().astype(np.float64)
    out = np.asarray(out, np.float64)
    real = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    diff = np.abs(out - ref)[real] / np.std(ref[real])
    return ParityReport(
        max_rel_err=float(diff.max()), mean_rel_err=float(diff.mean()),
        top1_agreement=float(np.mean(out.argmax(-1)[real] == ref.argmax(-1)[real])),
        jax_seconds=float(np.median(jax_times)), torch_seconds=float(np.median(torch_times[1:])),
        compile_seconds=compile_s)


