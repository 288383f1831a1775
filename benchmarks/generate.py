"""Greedy generation through the public API: phi_jax's `model.generate` against transformers' `generate`.

One process, the same random weights (phi_jax makes them; they are copied into transformers' model by the
one name table, phi_jax.io.names). Both sides are warmed up first (phi_jax's compilation time is reported
apart). For each batch size: time to first token = `generate(max_new_tokens=1)` on each side, and decode time
per step = (time of `generate(max_new_tokens=N)` - time to first token) / (N - 1); medians of `--repeats`
runs (>= 5), each run ending with the tokens on the host. The weight-bandwidth floor of a decode step is the
bytes of every weight a step reads / the read bandwidth measured in this run.

On the CPU both libraries get the same threads: the process is pinned to `--threads` cores (default all)
and torch uses that many. `--gpu` runs both on the first GPU (transformers in CUDA, JAX on its default GPU).

    python benchmarks/generate.py                          # phi-1.5 geometry, 4 layers, float32, CPU
    python benchmarks/generate.py --gpu --geometry phi2 --layers 32 --dtype bfloat16 --batch 1 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import phi_jax  # noqa: E402
from phi_jax.compilation import count_compilations  # noqa: E402
from phi_jax.generation.generate import bucket_length  # noqa: E402
from phi_jax.io.names import hf_key  # noqa: E402
from phi_jax.parity import median_seconds  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=("phi1_5", "phi2"), default="phi1_5")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed runs (>= 5); medians are reported")
    p.add_argument("--gpu", action="store_true", help="both libraries on the GPU")
    p.add_argument("--no-torch", action="store_true", help="skip transformers")
    p.add_argument("--threads", type=int, default=None, help="CPU cores for both libraries (default: all)")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be >= 5")
    return args


def config_for(args) -> phi_jax.PhiConfig:
    make = {"phi1_5": phi_jax.phi_1_5, "phi2": phi_jax.phi_2}[args.geometry]
    # No eos: every row decodes all the new tokens in both libraries.
    return make(num_hidden_layers=args.layers, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading `nbytes` of float32 once (a jitted sum on JAX's device)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a.reshape(8, -1), axis=1))
    total(x).block_until_ready()
    return nbytes / median_seconds(lambda: total(x).block_until_ready(), repeats)


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decode step reads: every parameter but the embedding table (one row)."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "embed_tokens" in path and not model.config.tie_word_embeddings:
            continue
        total += var.get_value().nbytes
    return total


def random_model(config, dtype):
    """phi_jax's model with random weights made on its device (0.02 * normal; LayerNorm scales near 1)."""
    model = nnx.eval_shape(lambda: phi_jax.PhiForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(0), 10000))

    def fill(path, a):
        if not jnp.issubdtype(a.dtype, jnp.floating):  # rng keys and counts
            return jax.random.key(0) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype)
        noise = 0.02 * jax.random.normal(next(keys), a.shape, jnp.float32)
        if "scale" in jax.tree_util.keystr(path):
            noise = noise + 1.0
        return noise.astype(a.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def torch_twin(model, config, device: str):
    """transformers' PhiForCausalLM on `device` holding phi_jax's weights."""
    import ml_dtypes
    import torch
    import transformers
    hf_config = transformers.PhiConfig(**{k: v for k, v in config.to_dict().items()
                                          if k not in ("id2label", "label2id", "architectures")})
    dtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[model.model.dtype]
    with torch.device(device):
        ref = transformers.PhiForCausalLM(hf_config).to(dtype).eval()
    params = dict(ref.named_parameters())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transpose = hf_key(path)
        arr = np.array(var.get_value())  # a writable host copy
        if transpose:
            arr = np.ascontiguousarray(arr.T)
        t = torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16) if arr.dtype == ml_dtypes.bfloat16 \
            else torch.from_numpy(arr)
        with torch.no_grad():
            params.pop(key).copy_(t)
    if params:
        raise ValueError(f"transformers parameters not filled: {sorted(params)[:5]}")
    return ref


def bench_phi_jax(model, ids, new_tokens, repeats):
    # one cache length for both calls, so that they share one compiled program (max_new_tokens is traced)
    kw = dict(eos_token_id=[], pad_token_id=0, cache_length=bucket_length(ids.shape[1]) + new_tokens)
    with count_compilations() as compiled:
        out = model.generate(ids, max_new_tokens=new_tokens, **kw)
        model.generate(ids, max_new_tokens=1, **kw)
    ttft = median_seconds(lambda: model.generate(ids, max_new_tokens=1, **kw), repeats)
    total = median_seconds(lambda: model.generate(ids, max_new_tokens=new_tokens, **kw), repeats)
    return out, compiled, ttft, total


def bench_torch(ref, ids, new_tokens, repeats, device):
    import torch
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids_t))
    with torch.no_grad():
        out = ref.generate(ids_t, max_new_tokens=new_tokens, **kw).cpu()  # warm-up
        ref.generate(ids_t, max_new_tokens=1, **kw).cpu()
        ttft = median_seconds(lambda: ref.generate(ids_t, max_new_tokens=1, **kw).cpu(), repeats)
        total = median_seconds(lambda: ref.generate(ids_t, max_new_tokens=new_tokens, **kw).cpu(), repeats)
    return out.numpy(), ttft, total


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.gpu:
        jax.config.update("jax_platforms", "cpu")
        cores = args.threads or len(os.sched_getaffinity(0))
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    import flax
    versions = f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}"
    device = "cuda" if args.gpu else "cpu"
    if not args.no_torch:
        import torch
        import transformers
        if args.gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
        if not args.gpu:
            torch.set_num_threads(cores)
        versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); host {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}")
    if not args.gpu:
        print(f"threads: process pinned to {cores} cores; XLA's pool and torch "
              f"({'skipped' if args.no_torch else torch.get_num_threads()} threads) share them")
    elif not args.no_torch:
        print(f"torch device: {torch.cuda.get_device_name(0)}")
    print(f"versions: {versions}")
    print(f"geometry {args.geometry}, {args.layers} layers, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats}")
    config = config_for(args)
    model = random_model(config, getattr(jnp, args.dtype))
    ref = None if args.no_torch else torch_twin(model, config, device)
    bandwidth = read_bandwidth(1 << 30 if args.gpu else 1 << 28)
    weights = weight_bytes_per_step(model)
    floor = weights / bandwidth
    print(f"read bandwidth (jax sum): {bandwidth / 1e9:.1f} GB/s; weights read per step {weights / 1e9:.3f} GB "
          f"-> floor {floor * 1e3:.2f} ms/step")
    steps = args.new_tokens - 1
    rng = np.random.default_rng(0)
    for batch in args.batch:
        ids = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        out, compiled, ttft, total = bench_phi_jax(model, ids, args.new_tokens, args.repeats)
        step = (total - ttft) / steps
        print(f"\nbatch {batch}")
        print(f"  phi_jax      : compile {compiled.seconds:.1f} s ({compiled.count} programs); first token {ttft * 1e3:.1f} ms; decode "
              f"{step * 1e3:.2f} ms/step = {step / floor:.2f}x floor; {batch * steps / (total - ttft):.1f} tokens/s "
              f"decode, {batch * args.new_tokens / total:.1f} tokens/s overall")
        if ref is None:
            continue
        ref_out, ref_ttft, ref_total = bench_torch(ref, ids, args.new_tokens, args.repeats, device)
        ref_step = (ref_total - ref_ttft) / steps
        same = np.array_equal(out, ref_out)
        agree = np.mean(out[:, args.prompt_len:] == ref_out[:, args.prompt_len:]) if out.shape == ref_out.shape \
            else float("nan")
        print(f"  transformers : first token {ref_ttft * 1e3:.1f} ms; decode {ref_step * 1e3:.2f} ms/step = "
              f"{ref_step / floor:.2f}x floor; {batch * steps / (ref_total - ref_ttft):.1f} tokens/s decode, "
              f"{batch * args.new_tokens / ref_total:.1f} tokens/s overall")
        print(f"  ratios       : first token {ttft / ref_ttft:.2f}x transformers' time; decode tokens/s "
              f"{ref_step / step:.2f}x transformers'; tokens identical: {same} ({agree:.0%} of new tokens agree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
