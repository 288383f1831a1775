"""`phi-jax` console command: one subcommand per module in phi_jax.cli.

Each module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("parity", "generate", "convert", "check", "finetune")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="phi-jax", description="Phi language models in JAX / Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"phi_jax.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"phi_jax.cli.{name}":
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
