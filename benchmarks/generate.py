"""Greedy decoding speed: phi_jax's compiled decode loop against transformers' `generate`.

One process, the same random weights (transformers writes the checkpoint, phi_jax loads it).
Both are warmed up first; phi_jax's compilation time is reported apart. For each batch size:
time to first token (prefill + first token), decode time per step, tokens per second, and the
weight-bandwidth floor of a decode step: bytes of every weight a step reads / the memory
bandwidth measured in this run.

    python benchmarks/generate.py                          # phi-1.5 geometry, 4 layers, float32, CPU
    python benchmarks/generate.py --geometry phi2 --layers 32 --dtype bfloat16 --no-torch --batch 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi_jax
from phi_jax.generation.generate import _prefill_program, _prepare, count_compilations, generate
from phi_jax.generation.sampling import Greedy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=("phi1_5", "phi2"), default="phi1_5")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    p.add_argument("--no-torch", action="store_true", help="skip transformers (random weights made in JAX)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return p.parse_args(argv)


def config_for(args) -> phi_jax.PhiConfig:
    make = {"phi1_5": phi_jax.phi_1_5, "phi2": phi_jax.phi_2}[args.geometry]
    # No eos: every row decodes all the new tokens in both libraries.
    return make(num_hidden_layers=args.layers, eos_token_id=None, bos_token_id=None)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of reading `nbytes` of float32 once: a jitted sum on the default device and, on CPU with
    torch installed, torch's multi-threaded sum (XLA's CPU reduction may not use every core)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a.reshape(8, -1), axis=1))
    total(x).block_until_ready()
    found = {"jax sum": nbytes / best_of(lambda: total(x).block_until_ready(), repeats)}
    del x
    if jax.default_backend() == "cpu" and "torch" in sys.modules:
        import torch
        t = torch.ones(nbytes // 4)
        found["torch sum"] = nbytes / best_of(lambda: float(t.sum()), repeats)
        del t
    return found


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decode step reads: every parameter but the embedding table (one row)."""
    params = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(params)
    total = 0
    for path, var in flat:
        if "embed_tokens" in path and not model.config.tie_word_embeddings:
            continue
        total += var.get_value().size * var.get_value().dtype.itemsize
    return total


def build_models(args, directory):
    config = config_for(args)
    dtype = getattr(jnp, args.dtype)
    if args.no_torch:
        model = nnx.eval_shape(lambda: phi_jax.PhiForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, abstract = nnx.split(model)
        keys = iter(jax.random.split(jax.random.key(0), 4096))
        params = jax.tree.map(lambda a: (0.02 * jax.random.normal(next(keys), a.shape, jnp.float32)).astype(a.dtype)
                              if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype), abstract)
        return nnx.merge(graphdef, params), None
    import torch
    import transformers
    hf_config = transformers.PhiConfig(**{k: v for k, v in config.to_dict().items()
                                          if k not in ("id2label", "label2id", "architectures")})
    torch.manual_seed(0)
    ref = transformers.PhiForCausalLM(hf_config).eval()
    if args.dtype == "bfloat16":
        ref = ref.to(torch.bfloat16)
    ref.save_pretrained(directory)
    model = phi_jax.PhiForCausalLM.from_pretrained(directory, dtype=dtype)
    return model, ref


def bench_phi_jax(model, ids, new_tokens, repeats):
    with count_compilations() as compiled:
        out = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0)
        p = _prepare(model, ids, None, new_tokens, [], 0, None)
        graphdef, params = nnx.split(model)

        def prefill():
            s, tok, _ = _prefill_program(graphdef, params, p.ids, p.mask, Greedy(), jnp.uint32(0), p.eos,
                                         cache_length=p.cache_length, out_length=p.out_length)
            return np.asarray(tok)

        prefill()
    ttft = best_of(prefill, repeats)
    total = best_of(lambda: generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0),
                    repeats)
    return out, compiled.seconds, ttft, total


def bench_torch(ref, ids, new_tokens, repeats):
    import torch
    ids_t = torch.from_numpy(ids.astype(np.int64))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids_t))
    with torch.no_grad():
        out = ref.generate(ids_t, max_new_tokens=new_tokens, **kw)  # warm-up
        ttft = best_of(lambda: ref.generate(ids_t, max_new_tokens=1, **kw), repeats)
        total = best_of(lambda: ref.generate(ids_t, max_new_tokens=new_tokens, **kw), repeats)
    return out.numpy(), ttft, total


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores, "
          f"{platform.processor() or platform.machine()}")
    import flax
    versions = f"jax {jax.__version__}, flax {flax.__version__}"
    if not args.no_torch:
        import torch
        import transformers
        torch.set_num_threads(args.threads or os.cpu_count())
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads), " \
                    f"transformers {transformers.__version__}"
    print(f"versions: python {sys.version.split()[0]}, {versions}")
    print(f"geometry {args.geometry}, {args.layers} layers, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as directory:
        model, ref = build_models(args, directory)
    found = memory_bandwidth()
    bandwidth = max(found.values())
    weights = weight_bytes_per_step(model)
    floor = weights / bandwidth
    print("memory bandwidth (read 1 GiB, best of 5): " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in found.items())
          + f"; weights read per step: {weights / 1e9:.3f} GB -> floor {floor * 1e3:.1f} ms/step at "
          f"{bandwidth / 1e9:.1f} GB/s")
    steps = args.new_tokens - 1
    rng = np.random.default_rng(0)
    for batch in args.batch:
        ids = rng.integers(3, model.config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        out, compile_s, ttft, total = bench_phi_jax(model, ids, args.new_tokens, args.repeats)
        step = (total - ttft) / steps
        print(f"\nbatch {batch}")
        print(f"  phi_jax      : compile {compile_s:.1f} s; first token {ttft * 1e3:.1f} ms; decode "
              f"{step * 1e3:.1f} ms/step = {floor and step / floor:.2f}x floor; "
              f"{batch * steps / (total - ttft):.1f} tokens/s decode, {batch * args.new_tokens / total:.1f} tokens/s "
              f"overall")
        if ref is None:
            continue
        ref_out, ref_ttft, ref_total = bench_torch(ref, ids, args.new_tokens, args.repeats)
        ref_step = (ref_total - ref_ttft) / steps
        same = np.array_equal(out, ref_out)
        print(f"  transformers : first token {ref_ttft * 1e3:.1f} ms; decode {ref_step * 1e3:.1f} ms/step = "
              f"{ref_step / floor:.2f}x floor; {batch * steps / (ref_total - ref_ttft):.1f} tokens/s decode, "
              f"{batch * args.new_tokens / ref_total:.1f} tokens/s overall")
        print(f"  ratios       : decode tokens/s {ref_step / step:.2f}x transformers, first token "
              f"{ref_ttft / ttft:.2f}x faster; tokens identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
