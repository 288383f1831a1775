"""Parity between phi_jax and transformers' PyTorch PhiForCausalLM on the same weights: one report for
`phi-jax parity` (a random checkpoint) and `phi-jax check` (a checkpoint directory).

- `random_checkpoint(dir)`: a transformers PhiForCausalLM with random weights (`randomize`), saved with
  `save_pretrained`; `write_tokenizer(dir, vocab_size)` adds a small byte-level BPE `tokenizer.json`.
- `compare(model, torch_model, ids, mask)`: both models on the same ids; logits at real positions,
  top-1 and greedy-generation agreement, optionally timings -> `ParityReport`.
- `check_parity(path)`: loads `path` (any layout phi_jax reads) in both libraries and compares; also
  lists the weights that hold NaN or inf, by tensor name.

The one error measure is `relative_error`: `|phi_jax - transformers| / std(transformers)` over real
(unmasked) positions, max and mean. `TOLERANCES` holds every limit a report applies, per phi_jax compute
dtype (transformers always runs in float32). torch and transformers are the `parity` extra; without them
`require_reference` raises `MissingExtraError` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time

import numpy as np

from phi_jax.errors import MissingExtraError  # (raised here; importable from here as before)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_rel_err: float  # largest allowed max |Δlogits| / std(reference logits) at real positions
    top1: float  # smallest allowed fraction of real positions whose argmax agrees
    greedy_exact: bool  # every greedy token must agree (else agreement is reported only)

    def describe(self) -> str:
        greedy = "all greedy tokens equal" if self.greedy_exact else "greedy agreement reported, not required"
        return (f"max relative logit error <= {self.max_rel_err:g}, top-1 agreement >= {100 * self.top1:g}%, "
                f"{greedy}, no NaN/inf weight")


# phi_jax compute dtype -> limits against transformers in float32. bf16 rounds weights and activations to 8
# mantissa bits (relative error ~4e-3 per product); 5e-2 of the logit spread and 95% top-1 leave room for
# that on a 2-layer model and fail on any real defect (a wrong tensor gives errors of order 1).
TOLERANCES = {"float32": Tolerance(1e-4, 1.0, True), "bfloat16": Tolerance(5e-2, 0.95, False)}

EXTRA = "parity"


def require_reference(what: str = "this command"):
    """Returns (torch, transformers) or raises MissingExtraError naming the `parity` extra."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingExtraError(f"{what} compares against transformers, which needs torch and transformers "
                                f"(missing: {e.name or e}); install them with: pip install 'phi_jax[{EXTRA}]'"
                                ) from e
    return torch, transformers


# ---- random reference checkpoints ------------------------------------------------------------------

def randomize(model, seed: int = 0) -> None:
    """Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases ~ 0.1 N, LayerNorm weight 1 + 0.2 N, bias 0.2 N.

    Logits come out at a few units and no parameter is trivially 0 or 1, so every one matters (transformers'
    default init gives near-uniform logits whose argmax ties hide errors).
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


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off inside the block (restored after)."""
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def random_checkpoint(directory: str, seed: int = 0, **config_kwargs):
    """Writes a random transformers PhiForCausalLM to `directory`; returns the torch model (eval mode)."""
    torch, transformers = require_reference("random_checkpoint")
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**config_kwargs)).eval()
    randomize(model, seed)
    with quiet_transformers():
        model.save_pretrained(directory)
    return model


EOS_TOKEN = "<|endoftext|>"

_CORPUS = """\
def fibonacci(n):
    \"\"\"Returns the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def distance(self, other):
        return ((self.x - other.x) ** 2 + (self.y - other.y) ** 2) ** 0.5

Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do.
The quick brown fox jumps over the lazy dog. Write a function that prints the numbers from 1 to 100.
import numpy as np
print(np.arange(10).sum())
"""


def write_tokenizer(directory, vocab_size: int) -> str:
    """Writes `tokenizer.json` (+ a `tokenizer_config.json` transformers reads): a byte-level BPE, like
    Phi's CodeGen tokenizer, trained on a small fixed text, with `<|endoftext|>` as id 0 and every id
    below `vocab_size` (>= 300). Any text encodes; returns the path of tokenizer.json."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 300:
        raise ValueError(f"write_tokenizer needs vocab_size >= 300 (256 byte tokens + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1024), special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    assert tok.get_vocab_size() <= vocab_size and tok.token_to_id(EOS_TOKEN) == 0
    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
                   "unk_token": EOS_TOKEN, "model_max_length": 2048}, f, indent=2)
    return path


# ---- the report ----------------------------------------------------------------------------------

def relative_error(out, ref, real=None) -> tuple[float, float]:
    """(max, mean) of |out - ref| / std(ref) over the positions where `real` ([B, T] bool) is True."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if real is not None:
        real = np.asarray(real, bool)
        out, ref = out[real], ref[real]
    diff = np.abs(out - ref) / np.std(ref)
    return float(diff.max()), float(diff.mean())


@dataclasses.dataclass
class ParityReport:
    title: str  # what was compared
    inputs: str  # which inputs
    dtype: str  # phi_jax compute dtype (transformers runs in float32)
    tolerance: Tolerance
    nonfinite: list[str] = dataclasses.field(default_factory=list)  # "name: k of n values NaN/inf"
    max_rel_err: float = float("nan")
    mean_rel_err: float = float("nan")
    top1: float = float("nan")
    greedy_agree: int = 0
    greedy_total: int = 0
    jax_seconds: float | None = None  # compiled forward, median, compilation excluded
    torch_seconds: float | None = None
    compile_seconds: float | None = None

    @property
    def compared(self) -> bool:
        return not math.isnan(self.max_rel_err)

    @property
    def passed(self) -> bool:
        t = self.tolerance
        return bool(not self.nonfinite and self.compared and self.max_rel_err <= t.max_rel_err
                    and self.top1 >= t.top1 and (not t.greedy_exact or self.greedy_agree == self.greedy_total))

    def lines(self) -> list[str]:
        t = self.tolerance
        ok = lambda b: "ok" if b else "FAIL"  # noqa: E731
        lines = [self.title, f"inputs: {self.inputs}; phi_jax in {self.dtype}, transformers in float32",
                 f"tolerances ({self.dtype}): {t.describe()}"]
        if self.nonfinite:
            lines.append(f"non-finite weights         {len(self.nonfinite)} tensors  FAIL")
            lines += [f"  {entry}" for entry in self.nonfinite]
        if self.compared:
            lines += [
                f"max relative logit error   {self.max_rel_err:.3e}  (tolerance {t.max_rel_err:g})  "
                f"{ok(self.max_rel_err <= t.max_rel_err)}",
                f"mean relative logit error  {self.mean_rel_err:.3e}",
                f"top-1 agreement            {100 * self.top1:.2f}%  (tolerance {100 * t.top1:g}%)  "
                f"{ok(self.top1 >= t.top1)}",
            ]
            if self.greedy_total:
                lines.append(f"greedy agreement           {self.greedy_agree}/{self.greedy_total} tokens  " + (
                    f"(all required)  {ok(self.greedy_agree == self.greedy_total)}" if t.greedy_exact
                    else "(reported only)"))
        if self.jax_seconds is not None:
            lines += [f"forward time, phi_jax      {1e3 * self.jax_seconds:.1f} ms  (median; compile "
                      f"{self.compile_seconds:.1f} s)",
                      f"forward time, transformers {1e3 * self.torch_seconds:.1f} ms  (median)",
                      f"speed-up                   {self.torch_seconds / self.jax_seconds:.2f}x"]
        lines.append(f"result: {'PASS' if self.passed else 'FAIL'}")
        return lines

    def format(self) -> str:
        return "\n".join(self.lines())


def nonfinite_weights(model) -> list[str]:
    """'name: k of n values NaN/inf' for each parameter holding a non-finite value, under its checkpoint name."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    found = []
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        bad = int(jnp.sum(~jnp.isfinite(x)))
        if bad:
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            parts = name.split(".")
            if parts[-1] == "value":  # the nnx.Variable's payload
                parts.pop()
            if parts[-1] in ("kernel", "embedding", "scale"):  # phi_jax leaf -> transformers' `weight`
                parts[-1] = "weight"
            found.append(f"{'.'.join(parts)}: {bad} of {x.size} values NaN/inf")
    return found


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compare(jax_model, torch_model, input_ids, attention_mask=None, *, dtype: str = "float32",
            tolerance: Tolerance | None = None, new_tokens: int = 8, repeats: int = 0, title: str = "parity",
            ) -> ParityReport:
    """Runs both models on `input_ids: [B, T]` (optionally right-padded by `attention_mask`) and compares logits
    at real positions; greedy generation of `new_tokens` from the columns every row holds; `repeats` > 0 also
    times both forwards (median of `repeats` after one warm-up call)."""
    if tolerance is None and dtype not in TOLERANCES:
        raise ValueError(f"compare: dtype={dtype!r} has no default tolerance; expected one of {sorted(TOLERANCES)} "
                         f"or a tolerance=")
    import jax
    import torch

    from phi_jax.compiled import compiled

    ids = np.asarray(input_ids, np.int32)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    real = mask.astype(bool)
    b, t = ids.shape
    report = ParityReport(title, f"{b} x {t} token ids" + ("" if real.all() else f", {int(real.sum())} real"),
                          dtype, tolerance or TOLERANCES[dtype])
    report.nonfinite = nonfinite_weights(jax_model)
    if report.nonfinite:
        return report
    fwd = compiled(jax_model)
    jax_mask = None if attention_mask is None else mask
    t0 = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(fwd(ids, jax_mask).logits), np.float64)  # [B, T, V]
    compile_s = time.perf_counter() - t0
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
        ref = torch_model(t_ids, attention_mask=t_mask).logits.double().numpy()
    report.max_rel_err, report.mean_rel_err = relative_error(ours, ref, real)
    report.top1 = float(np.mean(ours.argmax(-1)[real] == ref.argmax(-1)[real]))
    if repeats:
        report.compile_seconds = compile_s
        report.jax_seconds = median_seconds(lambda: jax.block_until_ready(fwd(ids, jax_mask).logits), repeats)
        with torch.no_grad():
            report.torch_seconds = median_seconds(lambda: torch_model(t_ids, attention_mask=t_mask), repeats)
    full = real.all(axis=0)
    prompt_len = t if full.all() else int(np.argmin(full))
    if new_tokens and prompt_len:
        prompt = ids[:, :prompt_len]
        # phi_jax's cached decode loop against transformers' generate, both stopping at the config's eos and
        # padding with 0 after it; transformers returns fewer columns once every row stopped.
        mine = jax_model.generate(prompt, max_new_tokens=new_tokens, pad_token_id=0)[:, prompt_len:]
        with torch.no_grad(), quiet_transformers():
            theirs = torch_model.generate(torch.from_numpy(prompt.astype(np.int64)),
                                          attention_mask=torch.ones(prompt.shape, dtype=torch.long), do_sample=False,
                                          max_new_tokens=new_tokens, pad_token_id=0)[:, prompt_len:].numpy()
        theirs = np.pad(theirs, ((0, 0), (0, new_tokens - theirs.shape[1])), constant_values=0)
        agree = 0  # tokens agree up to each row's first divergence (later tokens continue different prefixes)
        for a, c in zip(mine, theirs):
            diff = np.flatnonzero(a != c)
            agree += int(diff[0]) if diff.size else len(a)
        report.greedy_agree, report.greedy_total = agree, int(theirs.size)
    return report


def _reference_model(path: str, transformers, torch, tmp: str, progress: bool):
    """transformers' model of `path`: loaded directly when transformers reads the directory completely, else
    from a Hugging Face conversion of it (Orbax, Microsoft layouts). Returns (model, how)."""
    from phi_jax import convert
    with quiet_transformers():
        try:
            model, info = transformers.PhiForCausalLM.from_pretrained(
                path, dtype=torch.float32, local_files_only=True, output_loading_info=True)
            if not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
                return model.eval(), "transformers reads the directory itself"
        except (OSError, ValueError, KeyError, RuntimeError):
            pass
        hf_dir = os.path.join(tmp, "hf")
        convert.convert(path, hf_dir, to="hf", dtype="float32", progress=progress)
        model = transformers.PhiForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
        return model.eval(), "transformers reads phi_jax's Hugging Face conversion of it"


def check_parity(path, *, dtype: str = "float32", batch: int = 2, seq_len: int = 16, new_tokens: int = 8,
                 seed: int = 0, progress: bool = False) -> ParityReport:
    """Loads `path` in phi_jax (in `dtype`) and in transformers (float32) and compares them on fixed random ids."""
    import jax.numpy as jnp

    from phi_jax.modeling.model import PhiForCausalLM
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(TOLERANCES)}")
    for name, value, low in (("batch", batch, 1), ("seq_len", seq_len, 1), ("new_tokens", new_tokens, 0),
                             ("seed", seed, 0)):  # numpy refuses a negative seed only after both models loaded
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    torch, transformers = require_reference("phi-jax check")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    model = PhiForCausalLM.from_pretrained(path, dtype=getattr(jnp, dtype))
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq_len), dtype=np.int32)
    title = f"phi-jax check {path}"
    nonfinite = nonfinite_weights(model)
    if nonfinite:
        return ParityReport(title, f"{batch} x {seq_len} token ids", dtype, TOLERANCES[dtype], nonfinite=nonfinite)
    with tempfile.TemporaryDirectory() as tmp:
        ref_model, how = _reference_model(path, transformers, torch, tmp, progress)
    return compare(model, ref_model, ids, dtype=dtype, new_tokens=new_tokens, title=f"{title} ({how})")
