"""bf16 precision against the float32 reference: phi_jax in bfloat16 and transformers' own bfloat16 model, each
compared with transformers in float32 on the same random weights and token ids (the figures in README.md's
Precision section).

The weights are randomized (`phi_jax.parity.randomize`) and rounded to bf16, as released Phi weights are half
precision, so the figures measure compute precision rather than the rounding of the checkpoint. Prints the
top-1 agreement and max / mean relative logit error of each (median over `--seeds` weight draws, >= 5), plus
the float32 phi_jax error.

    python benchmarks/precision.py [--geometry phi2|phi1] [--layers 2] [--batch 8] [--seq 64] [--seeds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from bench_env import header, pin_threads

GEOMETRIES = {  # the test suite's small geometries (tests/conftest.py), vocabulary 512
    "phi1": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, partial_rotary_factor=0.5),
    "phi2": dict(hidden_size=160, intermediate_size=320, num_attention_heads=2, partial_rotary_factor=0.4),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="phi2")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seeds", type=int, default=5, help="weight draws (>= 5); medians are printed")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.seeds < 5:
        p.error("--seeds must be >= 5")
    threads = pin_threads(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax.numpy as jnp
    import torch
    import transformers

    import phi_jax
    from phi_jax.parity import randomize, relative_error
    if args.threads:
        torch.set_num_threads(threads)
    for line in header(threads):
        print(line)
    print(f"model: {args.geometry} test geometry, {args.layers} layers, vocab {args.vocab_size}; {args.batch} x "
          f"{args.seq} random token ids; weights rounded to bf16; reference: transformers float32")
    rows = {"phi_jax float32": [], "phi_jax bfloat16": [], "transformers bfloat16": []}
    for seed in range(args.seeds):
        cfg = transformers.PhiConfig(vocab_size=args.vocab_size, num_hidden_layers=args.layers,
                                     max_position_embeddings=max(128, args.seq), **GEOMETRIES[args.geometry])
        ref_model = transformers.PhiForCausalLM(cfg).eval()
        randomize(ref_model, seed)
        with torch.no_grad():
            for w in ref_model.parameters():
                w.copy_(w.bfloat16().float())
        ids = np.random.default_rng(seed).integers(0, args.vocab_size, (args.batch, args.seq))
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(ids)).logits.double().numpy()
        with tempfile.TemporaryDirectory() as d:
            ref_model.save_pretrained(d)
            outs = {f"phi_jax {dt}": np.asarray(phi_jax.PhiForCausalLM.from_pretrained(d, dtype=getattr(jnp, dt))(
                jnp.asarray(ids)).logits, np.float64) for dt in ("float32", "bfloat16")}
        with torch.no_grad():
            outs["transformers bfloat16"] = ref_model.bfloat16()(torch.from_numpy(ids)).logits.double().numpy()
        for name, out in outs.items():
            rows[name].append((float(np.mean(out.argmax(-1) == ref.argmax(-1))), *relative_error(out, ref)))
    for name, values in rows.items():
        top1, mx, mean = np.median(np.asarray(values), axis=0)
        print(f"{name:22s}: top-1 agreement {100 * top1:6.2f}%  max relative error {mx:.2e}  mean {mean:.2e}  "
              f"(median of {args.seeds} seeds; top-1 per seed "
              f"{', '.join(f'{100 * v[0]:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
