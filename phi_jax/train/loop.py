"""The fine-tuning run behind `phi-jax finetune`: load, shard, train, checkpoint, resume, export.

Everything a step depends on is a function of (seed, step): the batch (`data.batch_at`), the dropout key
(`step.step_key`), the learning rate (the schedule), so a run resumed from a checkpoint at step s computes
exactly the steps s, s+1, ... of the uninterrupted run. SIGTERM finishes the current step, saves and returns; a
step whose loss or gradient norm is not finite stops the run (ValueError) without saving it.
A resume refuses settings that change the steps computed (`_resume_settings`); the mesh may change (it
changes only the order of the reductions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi_jax.sharding as sharding
from phi_jax.config import PhiConfig
from phi_jax.io.atomic import atomic_output_dir, make_dirs, remove_created
from phi_jax.io.hf import is_checkpoint_file
from phi_jax.modeling.attention import ATTN_IMPLEMENTATIONS
from phi_jax.train import data as data_lib
from phi_jax.train.checkpoint import TrainCheckpoints, abstract_like
from phi_jax.train.evaluate import eval_batches, evaluate, make_eval_fn
from phi_jax.train.lora import add_lora, merge_lora
from phi_jax.train.step import (TrainConfig, make_optimizer, make_train_step, path_key, schedule, split_model,
                                step_key)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run. `mesh`: "data=1,fsdp=8,tensor=1" (empty: every device on fsdp)."""

    model: str
    data: str
    output: str
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    seed: int = 0
    mesh: str = ""
    lora_rank: int = 0
    lora_alpha: float | None = None  # LoRA's alpha: adapters scaled by alpha / rank (None: rank, scale 1)
    compute_dtype: str = "float32"
    attn_implementation: str = "xla"
    save_every: int = 100
    keep: int = 3
    resume: bool = False
    progress: bool = True
    export: bool = True
    eval_data: str | None = None  # held-out JSON lines: validation loss every `eval_every` steps and at the end
    eval_every: int | None = None  # None: every `save_every` steps
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        """A value the run cannot use is a ValueError naming the field as `RunConfig.<field>`, before anything is
        read (steps 0 trained nothing, seq_len 1 reported a loss of 0, a lora_alpha without lora_rank was ignored).
        Numpy scalars become Python numbers (a checkpoint's JSON meta records them)."""
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("save_every", 1), ("keep", 1),
                          ("lora_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                why = " (a row needs a token and the next one it predicts)" if name == "seq_len" else ""
                raise ValueError(f"RunConfig.{name} must be an int >= {low}{why}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"RunConfig.seed must be an int in [0, 2**63), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        alpha = self.lora_alpha
        if alpha is not None:
            if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating))
                    or not (0 < alpha < float("inf"))):
                raise ValueError(f"RunConfig.lora_alpha must be a finite number > 0 (None: RunConfig.lora_rank, "
                                 f"scale 1), got {alpha!r}")
            if not self.lora_rank:
                raise ValueError(f"RunConfig.lora_alpha={alpha!r} needs RunConfig.lora_rank >= 1 (LoRA's alpha "
                                 f"scales the adapters), got RunConfig.lora_rank=0")
            object.__setattr__(self, "lora_alpha", float(alpha))
        try:
            dtype = jnp.dtype(self.compute_dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"RunConfig.compute_dtype must name a floating dtype (e.g. 'float32', 'bfloat16'), got "
                             f"{self.compute_dtype!r}")
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"RunConfig.train must be a TrainConfig, got {type(self.train).__name__}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:  # else found only once the model is read
            raise ValueError(f"RunConfig.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got "
                             f"{self.attn_implementation!r}")
        every = self.eval_every
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
                raise ValueError(f"RunConfig.eval_every must be an int >= 1 (None: RunConfig.save_every), got "
                                 f"{every!r}")
            if self.eval_data is None:
                raise ValueError(f"RunConfig.eval_every={every!r} needs RunConfig.eval_data (the held-out JSON "
                                 f"lines to evaluate)")
            object.__setattr__(self, "eval_every", int(every))


def _lora_scale(run: RunConfig) -> float | None:
    """alpha / rank of a LoRA run (None for full fine-tuning)."""
    if not run.lora_rank:
        return None
    return float(run.lora_rank if run.lora_alpha is None else run.lora_alpha) / run.lora_rank


# setting -> its `phi-jax finetune` option: what a checkpoint records and a resume must match, since each changes
# the steps computed (the batches, the dropout keys, the schedule, the update or the numerics)
_RESUME_OPTIONS = {
    "steps": "--steps", "batch_size": "--batch-size", "seq_len": "--seq-len", "seed": "--seed",
    "data_rows": "--data", "data_digest": "--data", "model_config": "--model", "lora_rank": "--lora-rank",
    "lora_scale": "--lora-alpha", "learning_rate": "--lr",
    "warmup_steps": "--warmup-steps", "final_lr_ratio": None, "weight_decay": "--weight-decay", "b1": None,
    "b2": None, "eps": None, "max_grad_norm": "--max-grad-norm", "accum_steps": "--accum-steps",
    "remat_policy": "--remat", "compute_dtype": "--dtype", "attn_implementation": "--attn-implementation",
    "base_weights": "--model",  # a LoRA run's frozen base (`weights_fingerprint`), checked once the model is read
}


# the model's fields that shape its computation (not its token ids, head labels or cache default)
_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
                 "layer_norm_eps", "tie_word_embeddings", "rope_parameters", "qk_layernorm")


def _resume_settings(run: RunConfig, rows: dict, config: PhiConfig) -> dict:
    """The settings of `_RESUME_OPTIONS` of `run` on packed `rows` of a model of `config` (JSON values, as a
    checkpoint's meta stores them): the data by its row count and a digest of the rows (another file, tokenizer
    or packing gives other batches), the model by its architecture (`_MODEL_FIELDS`)."""
    t = run.train
    model_config = json.loads(json.dumps({k: config.to_dict()[k] for k in _MODEL_FIELDS}))
    values = dict(steps=run.steps, batch_size=run.batch_size, seq_len=run.seq_len, seed=run.seed,
                  data_rows=len(rows["input_ids"]), data_digest=data_lib.digest(rows), model_config=model_config,
                  lora_rank=run.lora_rank, lora_scale=_lora_scale(run),
                  learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, final_lr_ratio=t.final_lr_ratio,
                  weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps, max_grad_norm=t.max_grad_norm,
                  accum_steps=t.accum_steps, remat_policy=t.remat_policy, compute_dtype=run.compute_dtype,
                  attn_implementation=run.attn_implementation)
    assert values.keys() == _RESUME_OPTIONS.keys() - {"base_weights"}
    return values


def weights_fingerprint(arrays: dict, mesh=None) -> str | None:
    """A digest of the values of `arrays` (name -> float array; None when empty) that does not depend on how they
    are sharded: per array, the sum of its elements' bit patterns, each times an odd hash of its flat index, in
    uint32 (integer sums wrap, the same in any order), hashed with the names. A LoRA run restores only its
    adapters, so its base weights come from --model on every resume: another model of the same architecture
    (the base merged with other adapters, another fine-tune) would train on silently. `mesh`: the arrays' mesh
    (the sums come back replicated on it, readable on every host)."""
    if not arrays:
        return None

    def bits(x):
        narrow = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)  # wider: several uint32 each
        b = jax.lax.bitcast_convert_type(x, narrow).reshape(-1).astype(jnp.uint32)
        index = jax.lax.iota(jnp.uint32, b.shape[0])
        return jnp.sum(b * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)
    names = sorted(arrays)
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sums = jax.jit(lambda xs: jnp.stack([bits(x) for x in xs]), out_shardings=out)([arrays[k] for k in names])
    h = hashlib.sha256()
    for name, total in zip(names, np.asarray(sums).tolist()):
        h.update(f"{name}={total};".encode())
    return h.hexdigest()[:16]


def check_resume(saved: dict, settings: dict) -> list[str]:
    """Raises a one-line ValueError naming the first setting whose value differs from the checkpoint's `saved`
    meta (for a dict, its first differing entry); returns the settings the checkpoint does not record (written by
    an older phi_jax: not checked)."""
    for k, want in settings.items():
        if k in saved and saved[k] != want:
            name, have = k, saved[k]
            if isinstance(have, dict) and isinstance(want, dict):
                sub = next(s for s in sorted(set(have) | set(want), key=str) if have.get(s) != want.get(s))
                name, have, want = f"{k}.{sub}", have.get(sub), want.get(sub)
            option = f" ({_RESUME_OPTIONS[k]})" if _RESUME_OPTIONS[k] else ""
            raise ValueError(f"cannot resume: the checkpoint has {name}={have}, this run {want}{option}; resume "
                             f"with the checkpoint's value or start a new --output")
    return [k for k in settings if k not in saved]


def _resume_step(run: RunConfig, ckpts: TrainCheckpoints, settings: dict, is_main: bool) -> int:
    """The step to continue from: 0 for a new run, else the latest checkpoint's, once `check_resume` accepts
    its settings. Checkpoints without `run.resume` are a FileExistsError."""
    latest = ckpts.latest_step()
    if latest is None:
        return 0
    if not run.resume:
        raise FileExistsError(f"{ckpts.directory} holds checkpoints: pass --resume to continue or use a new "
                              f"--output")
    unchecked = check_resume(ckpts.meta(latest), settings)
    if unchecked and is_main:
        print(f"warning: the checkpoint at step {latest} does not record {', '.join(unchecked)} (an older "
              f"phi_jax wrote it): resuming without checking them", file=sys.stderr)
    return latest


def _mesh(text: str):
    if not text:
        return sharding.make_mesh()
    return sharding.make_mesh(**sharding.parse_mesh(text))


def _shard_tree(tree: dict, template, mesh, rules) -> dict:
    names = {path_key(p): (v.get_metadata().get("out_sharding"), v.get_value().shape) for p, v in template}
    return {k: jax.sharding.NamedSharding(mesh, sharding.spec_for(*names[k], mesh, rules)) for k in tree}


def build(split, tx, mesh, rules=sharding.DEFAULT_RULES, accum_steps: int = 1):
    """Places the split model's parameters on `mesh` and compiles the sharded step.

    Returns `(state, frozen, step_fn, batch_sharding)`: `step_fn(state, frozen, batch, key) -> (state, metrics)`
    with the state donated; the optimizer state takes its parameters' shardings. Parameters already on their
    sharding are used in place (no copy), so the model's own arrays are donated to the first step.
    """
    train_sh = _shard_tree(split.trainable, split.template, mesh, rules)
    frozen_sh = _shard_tree(split.frozen, split.template, mesh, rules)
    def put(v, sh):
        if isinstance(v, jax.Array) and v.sharding == sh:
            return v  # loaded in place (`from_pretrained(..., mesh=mesh)`)
        if jax.process_count() == 1:
            return jax.device_put(v, sh)  # device to device
        return sharding.place(np.asarray(v), sh)  # each process places its slices from its host copy

    params = {k: put(v, train_sh[k]) for k, v in split.trainable.items()}
    frozen = {k: put(v, frozen_sh[k]) for k, v in split.frozen.items()}
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)})(params)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = sharding.batch_sharding(mesh, rules)
    step = make_train_step(split, tx, accum_steps)

    def traced_step(*args):
        with sharding.rules_in_force(mesh, rules):  # the model's activation constraints, while tracing
            return step(*args)

    step_fn = jax.jit(traced_step, in_shardings=(state_sh, frozen_sh, batch_sh, None),
                      out_shardings=(state_sh, None), donate_argnums=0)
    return state, frozen, step_fn, batch_sh


def _read_log(path: str, upto: int) -> list[dict]:
    """The records of metrics log `path` up to step `upto`. A last line cut short (the process killed while writing
    it, a full disk) is dropped; any other line that is not a record is a ValueError naming `path:line`."""
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        lines = f.readlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            why = None if isinstance(r, dict) and isinstance(r.get("step"), int) else "not a record with a step"
        except json.JSONDecodeError as e:
            why = f"not valid JSON ({e.msg} at column {e.colno})"
        if why is None:
            if r["step"] <= upto:
                rows.append(r)
        elif n == len(lines) and not line.endswith("\n"):
            break  # the half-written last line
        else:
            raise ValueError(f"{path}:{n}: {why}; repair or delete the line (or the file) to continue the run")
    return rows


def plot_losses(log_path: str, png_path: str) -> None:
    """The loss curve of a metrics log as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _read_log(log_path, upto=1 << 62)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training")
    held_out = [r for r in rows if "eval_loss" in r]
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["eval_loss"] for r in held_out], "o-", label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def _gather(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export(split, params: dict, frozen: dict, directory: str, tokenizer_dir: str | None = None) -> None:
    """Writes the trained model (adapters merged) as a Hugging Face directory, with the tokenizer files.

    Every process takes part in gathering each tensor (a collective across hosts), one tensor at a time; only
    process 0 keeps them, builds the model and writes it, so the other hosts never hold more than one whole
    tensor."""
    main = jax.process_index() == 0

    def gather_all(tree: dict) -> dict:
        kept = {}
        for k, v in tree.items():
            whole = _gather(v)
            if main:
                kept[k] = jnp.asarray(whole)
            del whole
        return kept

    params, frozen = gather_all(params), gather_all(frozen)
    if not main:
        return
    model = merge_lora(split.merge(params, frozen))
    # weights, config and tokenizer appear together: `directory` holds the previous export or this one, whole
    # (other files there, a README, are carried over)
    replaced = lambda name: is_checkpoint_file(name) or name in TOKENIZER_FILES  # noqa: E731
    with atomic_output_dir(directory, overwrite=True, keep=lambda name: not replaced(name)) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(tmp, name))


def _diverged(step: int, record: dict, ckpts: TrainCheckpoints):
    """Raises the one-line ValueError of a step whose loss or gradient norm is not finite, once the checkpoints
    already being written are complete (training on would save NaN weights over the last good checkpoints)."""
    ckpts.wait()
    latest = ckpts.latest_step()
    kept = f"the checkpoints up to step {latest} are kept" if latest else "no checkpoint was written"
    raise ValueError(f"step {step}: the loss is {record['loss']}, the gradient norm {record['grad_norm']}: "
                     f"training diverged ({kept}); lower --lr or raise --warmup-steps, and start a new --output")


def finetune(run: RunConfig, model=None, rules=sharding.DEFAULT_RULES) -> dict:
    """Runs (or resumes) `run`; returns {"losses": {step: loss}, "eval_losses": {step: validation loss} (with
    `run.eval_data`), "interrupted": bool, "export": dir or None}.

    `model`: an already built PhiForCausalLM (else loaded from `run.model`). A run that fails before writing
    anything removes the directories it created for `run.output`.
    """
    if not os.path.isdir(run.model):
        raise FileNotFoundError(f"model directory not found: {run.model}")
    out_dir = os.path.abspath(run.output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--output {run.output} is a file; the run directory must be a directory")
    created = make_dirs(out_dir)
    try:
        return _finetune(run, model, rules, out_dir)
    except BaseException:
        remove_created(created)  # a run that failed before writing anything leaves no empty directories behind
        raise


def _finetune(run: RunConfig, model, rules, out_dir: str) -> dict:
    from phi_jax.modeling.model import PhiForCausalLM
    mesh = _mesh(run.mesh)
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if run.batch_size % (rows_split * run.train.accum_steps):
        raise ValueError(f"--batch-size {run.batch_size} must be a multiple of data x fsdp ({rows_split}) x "
                         f"accum-steps ({run.train.accum_steps})")
    # the data first: a bad record fails before a large model is read
    config = model.config if model is not None else PhiConfig.from_pretrained(run.model)
    tokenizer = data_lib.load_tokenizer(run.model)
    rows = data_lib.load_dataset(run.data, tokenizer, config, run.seq_len)
    held_out = None if run.eval_data is None else eval_batches(
        data_lib.load_dataset(run.eval_data, tokenizer, config, run.seq_len), run.batch_size)
    eval_every = run.eval_every or run.save_every
    settings = _resume_settings(run, rows, config)
    ckpts = TrainCheckpoints(os.path.join(out_dir, "checkpoints"), save_every=run.save_every, keep=run.keep)
    is_main = jax.process_index() == 0
    try:
        start = _resume_step(run, ckpts, settings, is_main)  # a refused resume fails before the model is read
        if model is None:
            model = PhiForCausalLM.from_pretrained(run.model, dtype=jnp.dtype(run.compute_dtype),
                                                   param_dtype=jnp.float32, mesh=mesh, rules=rules,
                                                   attn_implementation=run.attn_implementation)
        if run.lora_rank:
            add_lora(model, run.lora_rank, alpha=run.lora_alpha, seed=run.seed)
        split = split_model(model, nnx.LoRAParam if run.lora_rank else nnx.Param,
                            remat_policy=run.train.remat_policy)
        tx = make_optimizer(dataclasses.replace(run.train, total_steps=run.steps))
        state, frozen, step_fn, batch_sh = build(split, tx, mesh, rules, run.train.accum_steps)
        settings["base_weights"] = weights_fingerprint(frozen, mesh) if run.lora_rank else None
        if start:
            check_resume(ckpts.meta(start), {"base_weights": settings["base_weights"]})
        eval_fn = None
        if held_out is not None:  # the same parameters through the model with dropout off
            eval_split = dataclasses.replace(split_model(model, nnx.LoRAParam if run.lora_rank else nnx.Param,
                                                         train=False), trainable={}, frozen={})
            eval_fn = make_eval_fn(eval_split, jax.tree.map(lambda x: x.sharding, state["params"]),
                                   jax.tree.map(lambda x: x.sharding, frozen), batch_sh, mesh, rules)
        if start:
            state, _ = ckpts.restore(abstract_like(state), start)
    except BaseException:
        ckpts.close()
        raise
    log_path = os.path.join(out_dir, "metrics.jsonl")
    logged = _read_log(log_path, upto=start)
    losses = {r["step"]: r["loss"] for r in logged}
    eval_losses = {r["step"]: r["eval_loss"] for r in logged if "eval_loss" in r}
    if is_main:
        with open(log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in logged)
        os.replace(log_path + ".tmp", log_path)

    def meta(step):
        return {"step": step, "rows_seen": step * run.batch_size, **settings,
                "rng": np.asarray(jax.random.key_data(step_key(run.seed, step))).tolist()}

    stop = {"flag": False}
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    except ValueError:  # not the main thread
        pass
    bar = None
    if run.progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=run.steps, initial=start, desc="finetune", unit="step")
    tokens_per_step = run.batch_size * run.seq_len
    interrupted, last = False, None
    lr_at = schedule(dataclasses.replace(run.train, total_steps=run.steps))
    try:
        with jax.set_mesh(mesh), open(log_path, "a") if is_main else open(os.devnull, "w") as log:
            for step in range(start, run.steps):
                t0 = time.perf_counter()
                host_batch = data_lib.batch_at(rows, step, run.batch_size, run.seed)
                batch = {k: sharding.place(v, batch_sh) for k, v in host_batch.items()}
                state, metrics = step_fn(state, frozen, batch, step_key(run.seed, step))
                loss = float(metrics["loss"])
                dt = time.perf_counter() - t0
                record = {"step": step + 1, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                          "lr": float(lr_at(step)), "targets": int(metrics["tokens"]),
                          "tokens_per_s": tokens_per_step / dt, "time": time.time()}
                losses[step + 1] = loss
                if eval_fn is not None and ((step + 1) % eval_every == 0 or step + 1 == run.steps):
                    record["eval_loss"], record["eval_targets"] = evaluate(eval_fn, state["params"], frozen,
                                                                           held_out, batch_sh)
                    eval_losses[step + 1] = record["eval_loss"]
                log.write(json.dumps(record) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(1)
                    shown = {} if not eval_losses else {"eval": f"{eval_losses[max(eval_losses)]:.4f}"}
                    bar.set_postfix(loss=f"{loss:.4f}", **shown, tok_s=f"{tokens_per_step / dt:,.0f}")
                if not (math.isfinite(loss) and math.isfinite(record["grad_norm"])):
                    _diverged(step + 1, record, ckpts)  # this state is not saved: the last good ones stay kept
                last = ckpts.save(step + 1, state, meta(step + 1)) and step + 1
                if stop["flag"] and step + 1 < run.steps:
                    interrupted = True
                    break
        done = int(state["step"])
        if ckpts.latest_step() != done and last != done:
            ckpts.save(done, state, meta(done), force=True)
        ckpts.wait()
    finally:
        ckpts.close()
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if is_main and os.path.exists(log_path):
        plot_losses(log_path, os.path.join(out_dir, "loss.png"))
    export_dir = None
    if run.export and not interrupted:
        export_dir = os.path.join(out_dir, "model")
        export(split, state["params"], frozen, export_dir, run.model)
    return {"losses": losses, "eval_losses": eval_losses, "interrupted": interrupted, "export": export_dir}

