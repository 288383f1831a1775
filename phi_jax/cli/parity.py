"""`phi-jax parity`: write a random Phi with transformers, load it in phi_jax, print the parity report."""

from __future__ import annotations

import tempfile

import numpy as np

HELP = ("write a small random Phi with transformers to a temporary directory, load it in phi_jax, and print "
        "the parity report (logit error, top-1 agreement) and both forward times")

GEOMETRIES = {
    "phi-1.5": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, partial_rotary_factor=0.5),
    "phi-2": dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=32, partial_rotary_factor=0.4),
    "small": dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, partial_rotary_factor=0.5),
}


def add_arguments(p) -> None:
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="phi-1.5")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192, help="smaller than Phi's 51200 to keep the file small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative logit error that passes")


def run(args) -> int:
    import torch

    import phi_jax
    from phi_jax.parity import compare, random_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        cfg = dict(GEOMETRIES[args.geometry], num_hidden_layers=args.layers, vocab_size=args.vocab_size)
        print(f"writing a random {args.geometry} Phi ({args.layers} layers, vocab {args.vocab_size}) with "
              f"transformers to {d}")
        torch_model = random_checkpoint(d, **cfg)
        model = phi_jax.PhiForCausalLM.from_pretrained(d)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, args.vocab_size, (args.batch, args.seq))
        mask = np.ones_like(ids)
        if args.batch > 1:
            mask[-1, args.seq * 3 // 4:] = 0  # right padding in the last row: real positions are compared
        report = compare(model, torch_model, ids, mask)
    print(f"inputs: batch {args.batch} x {args.seq} tokens, float32")
    for line in report.lines():
        print("  " + line)
    ok = report.max_rel_err <= args.tolerance
    print(f"parity: {'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})")
    return 0 if ok else 1
