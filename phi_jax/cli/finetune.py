"""`phi-jax finetune --model DIR --data FILE.jsonl --output DIR`: fine-tunes on a device mesh.

Writes OUTPUT/checkpoints (Orbax, every --save-every steps and at the end), OUTPUT/metrics.jsonl (one JSON line
per step: loss, grad_norm, lr, targets, tokens_per_s; eval_loss and eval_targets with --eval-data), OUTPUT/loss.png and OUTPUT/model (a Hugging Face
directory that transformers loads, LoRA adapters merged, tokenizer files copied). SIGTERM finishes the current
step, saves a checkpoint and exits 143 (128 + SIGTERM, a terminated process's status: the run is not complete and
nothing is exported); `--resume` continues from the last checkpoint exactly, and refuses settings other than the
checkpoint's that change the steps computed (--steps, --lr, --seed, --dtype, ...: one error line naming both
values). Compiled programs go to JAX's persistent compilation cache (--compile-cache, phi_jax/cli/common.py).
"""

from __future__ import annotations

import re
import signal
import sys

HELP = "fine-tune a checkpoint on JSON-lines text or prompt/completion pairs (sharded, resumable)"
COMPILES = True
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (weights and tokenizer.json)")
    parser.add_argument("--data", required=True,
                        help='JSON lines of {"text": ...} or {"prompt": ..., "completion": ...}')
    parser.add_argument("--output", required=True, help="run directory: checkpoints, metrics, loss.png, model/")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (over all devices)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    parser.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--remat", default=None, metavar="POLICY",
                        help="recompute layers in the backward pass with this jax.checkpoint_policies policy "
                             "(e.g. nothing_saveable, dots_with_no_batch_dims_saveable) or phi_jax's "
                             "dots_and_attention_saveable (also keeps the cudnn/pallas attention's residuals)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (master weights and optimizer state stay float32)")
    parser.add_argument("--attn-implementation", default="xla", choices=("xla", "cudnn", "pallas", "auto"),
                        help="attention kernel (cudnn: flash attention on CUDA in bf16)")
    parser.add_argument("--mesh", default="", help="e.g. data=1,fsdp=8,tensor=1 (default: every device on fsdp)")
    parser.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters only (0: full)")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="LoRA's alpha: the adapters' output is scaled by alpha / rank (default: rank, scale 1)")
    parser.add_argument("--seed", type=int, default=0, help="data order and dropout")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--eval-data", default=None, metavar="FILE.jsonl",
                        help="held-out JSON lines (as --data): validation loss in metrics.jsonl and loss.png")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: "
                        "--save-every; the last step is always evaluated)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# RunConfig / TrainConfig fields whose option is not `--` + the field with dashes
_RENAMED = {"learning_rate": "--lr", "remat_policy": "--remat", "compute_dtype": "--dtype"}


def _in_flags(message: str) -> str:
    """A RunConfig / TrainConfig error (`TrainConfig.learning_rate must be ...`) in this command's words: each field
    as its option (`--lr must be ...`); the option's 0 where `--max-grad-norm 0` stands for None, other notes
    about None (no option spells it) dropped."""
    message = message.replace("(None: no clipping)", "(0: no clipping)")
    message = re.sub(r" \(None: [^)]*\)", "", message)
    return re.sub(r"\b(?:RunConfig|TrainConfig)\.(\w+)",
                  lambda m: _RENAMED.get(m[1], "--" + m[1].replace("_", "-")), message)


def _configs(args):
    """The run's RunConfig: the library checks every value; its error names the option here."""
    from phi_jax.train.loop import RunConfig
    from phi_jax.train.step import TrainConfig
    try:
        train = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                            max_grad_norm=args.max_grad_norm or None, accum_steps=args.accum_steps,
                            remat_policy=args.remat)
        return RunConfig(model=args.model, data=args.data, output=args.output, steps=args.steps,
                         batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, mesh=args.mesh,
                         lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, compute_dtype=args.dtype,
                         attn_implementation=args.attn_implementation, save_every=args.save_every,
                         keep=args.keep, resume=args.resume, progress=not args.no_progress,
                         eval_data=args.eval_data, eval_every=args.eval_every, train=train)
    except ValueError as e:
        raise ValueError(_in_flags(str(e))) from None


def run(args) -> int:
    from phi_jax.train.loop import finetune

    run_cfg = _configs(args)  # a bad value fails before anything is read or written
    result = finetune(run_cfg)  # a user's mistake raises; phi_jax.cli.main maps it to one error line and status
    losses = result["losses"]
    if result["interrupted"]:
        print(f"terminated at step {max(losses)}: checkpoint saved; rerun with --resume", file=sys.stderr)
        return EXIT_TERMINATED
    if losses:
        print(f"step {max(losses)}: loss {losses[max(losses)]:.4f}; model written to {result['export']}",
              file=sys.stderr)
    return 0
