"""Parity of a converted checkpoint: phi_jax against transformers' PyTorch PhiForCausalLM on fixed inputs.

`check_parity(path)` loads `path` (Hugging Face, phi_jax Orbax, or Microsoft layout) in phi_jax and, when
torch is installed, in transformers (a non-HF directory is first converted to a temporary HF directory),
runs both on fixed token ids, and returns a `ParityReport`: max and mean relative logit error
(`|Δ| / std(reference logits)`), top-1 agreement, greedy-generation agreement (phi_jax's cached decode
loop against transformers' `generate`), and pass/fail against
`TOLERANCES` for the compute dtype used by phi_jax (the reference always runs in float32).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

# compute dtype -> (max relative logit error, minimum top-1 agreement, greedy tokens must all agree)
TOLERANCES = {"float32": (1e-4, 1.0, True), "bfloat16": (5e-2, 0.95, False)}


@dataclasses.dataclass
class ParityReport:
    path: str
    layout: str
    dtype: str
    batch: int
    seq_len: int
    new_tokens: int
    reference: bool  # False when torch / transformers are not installed
    max_rel_err: float = float("nan")
    mean_rel_err: float = float("nan")
    top1: float = float("nan")
    greedy_agree: int = 0
    greedy_total: int = 0
    tolerances: tuple = ()

    @property
    def passed(self) -> bool | None:
        if not self.reference:
            return None
        max_tol, top1_tol, greedy_exact = self.tolerances
        return bool(self.max_rel_err <= max_tol and self.top1 >= top1_tol
                    and (not greedy_exact or self.greedy_agree == self.greedy_total))

    def format(self) -> str:
        lines = [f"phi-jax check {self.path} ({self.layout} layout, phi_jax in {self.dtype}, "
                 f"transformers in float32)",
                 f"inputs: {self.batch} x {self.seq_len} fixed token ids; greedy: {self.new_tokens} new tokens"]
        if not self.reference:
            lines.append("torch / transformers not installed: phi_jax ran, nothing to compare against")
            return "\n".join(lines)
        max_tol, top1_tol, greedy_exact = self.tolerances
        ok = lambda b: "ok" if b else "FAIL"  # noqa: E731
        lines += [
            f"max relative logit error   {self.max_rel_err:.3e}  (tolerance {max_tol:.0e})  "
            f"{ok(self.max_rel_err <= max_tol)}",
            f"mean relative logit error  {self.mean_rel_err:.3e}",
            f"top-1 agreement            {100 * self.top1:.2f}%  (tolerance {100 * top1_tol:.0f}%)  "
            f"{ok(self.top1 >= top1_tol)}",
            f"greedy agreement           {self.greedy_agree}/{self.greedy_total} tokens  "
            + (f"(all required)  {ok(self.greedy_agree == self.greedy_total)}" if greedy_exact else "(reported only)"),
            f"result: {'PASS' if self.passed else 'FAIL'}",
        ]
        return "\n".join(lines)


def check_parity(path, *, dtype: str = "float32", batch: int = 2, seq_len: int = 16, new_tokens: int = 8,
                 seed: int = 0, progress: bool = False) -> ParityReport:
    import jax.numpy as jnp

    from phi_jax import convert
    from phi_jax.compiled import compiled
    from phi_jax.modeling.model import PhiForCausalLM
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(TOLERANCES)}")
    path = os.fspath(path)
    layout = convert.detect_layout(path)
    model = PhiForCausalLM.from_pretrained(path, dtype=getattr(jnp, dtype))
    vocab = model.config.vocab_size
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len), dtype=np.int32)
    ours = np.asarray(compiled(model)(ids).logits, np.float64)  # [B, T, V]
    report = ParityReport(path, layout, dtype, batch, seq_len, new_tokens, reference=False,
                          tolerances=TOLERANCES[dtype])
    if not np.isfinite(ours).all():
        raise ValueError(f"{path}: phi_jax produced non-finite logits")
    try:
        import torch
        import transformers
    except ImportError:
        return report
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = path
        if layout != "hf":
            hf_dir = os.path.join(tmp, "hf")
            convert.convert(path, hf_dir, to="hf", layout=layout, dtype="float32", progress=progress)
        ref_model = transformers.PhiForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids).long()).logits.double().numpy()
        gen = ref_model.generate(torch.from_numpy(ids).long(), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)[:, seq_len:].numpy()
    scale = ref.std()
    report.reference = True
    report.max_rel_err = float(np.abs(ours - ref).max() / scale)
    report.mean_rel_err = float(np.abs(ours - ref).mean() / scale)
    report.top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    # phi_jax's own decode loop (KV cache), both stopping at the config's eos and padding with 0 after it;
    # transformers returns fewer columns when every row stopped early, phi_jax holds padding there.
    mine = model.generate(ids, max_new_tokens=new_tokens, pad_token_id=0)[:, seq_len:]
    gen = np.pad(gen, ((0, 0), (0, new_tokens - gen.shape[1])), constant_values=0)
    # tokens agree up to each row's first divergence (later tokens continue different prefixes)
    agree = 0
    for a, b in zip(mine, gen):
        diff = np.nonzero(a != b)[0]
        agree += int(diff[0]) if diff.size else len(a)
    report.greedy_agree, report.greedy_total = agree, int(gen.size)
    return report
