"""`phi-jax convert MODE SRC DST`: streaming checkpoint conversion (see phi_jax.convert).

Modes: hf-to-orbax, orbax-to-hf, legacy-to-hf, legacy-to-orbax. Output is built in a hidden temporary
directory beside DST and renamed into place when complete; Ctrl-C or SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import sys

HELP = "convert checkpoints: Hugging Face <-> phi_jax Orbax, Microsoft's original layouts -> either"
MODES = {"hf-to-orbax": ("hf", "orbax"), "orbax-to-hf": ("orbax", "hf"), "legacy-to-hf": ("legacy", "hf"),
         "legacy-to-orbax": ("legacy", "orbax")}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, (src, dst) in MODES.items():
        p = sub.add_parser(mode, help=f"{src} directory -> {dst} directory")
        p.add_argument("src", help=f"source directory ({src} layout)")
        p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="cast every tensor (default: keep each tensor's dtype)")
        if dst == "hf":
            p.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
        else:
            p.add_argument("--chunk-size", default="256MB",
                           help="tensors held in memory per Orbax partial save (default 256MB)")
        if src == "legacy":
            p.add_argument("--config", default=None,
                           help="config.json to use (Microsoft or transformers layout) when SRC has none")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run(args) -> int:
    from phi_jax import convert
    from phi_jax.io import legacy as legacy_names
    from phi_jax.config import PhiConfig
    layout, to = MODES[args.mode]
    kw = {}
    if getattr(args, "config", None):
        try:
            with open(os.path.expanduser(args.config), encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {args.config} is not UTF-8 text ({e.reason})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{args.config}: expected a JSON object, got {type(d).__name__}")
        kw["config"] = (PhiConfig.from_dict(d) if d.get("model_type", "phi") == "phi"
                        else legacy_names.legacy_config(d, args.config))
    if to == "hf":
        kw["shard_size"] = args.shard_size
    else:
        kw["chunk_size"] = args.chunk_size
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:  # SRC inside a DST that --overwrite would replace is refused there, before anything is written
        summary = convert.convert(args.src, args.dst, to=to, layout=layout, dtype=args.dtype,
                                  overwrite=args.overwrite, progress=not args.no_progress, **kw)
    finally:
        signal.signal(signal.SIGTERM, previous)
    gb = summary["bytes_written"] / 1e9
    print(f"wrote {summary['dst']}: {summary['tensors']} tensors, {gb:.3f} GB in {summary['seconds']:.1f} s "
          f"({gb / max(summary['seconds'], 1e-9):.2f} GB/s)")
    return 0


def main(mode: str, argv=None) -> int:
    """Entry point of the convert/*.py scripts: `main('hf-to-orbax', ['SRC', 'DST', ...])` = `phi-jax convert
    hf-to-orbax SRC DST ...` (same errors and exit statuses)."""
    from phi_jax.cli import main as phi_jax_main
    return phi_jax_main(["convert", mode, *(sys.argv[1:] if argv is None else argv)])
