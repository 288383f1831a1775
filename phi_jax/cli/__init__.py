"""`phi-jax` console command: one subcommand per module in phi_jax.cli.

Each command module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`; `main` parses the
arguments, sets up JAX's persistent compilation cache (commands that compile) and maps the exceptions a
user's mistake raises to one `error: ...` line on stderr and an exit status shared by every command:

  0    success
  1    the command ran and its verdict is FAIL (`check`, `parity`)
  2    bad argument or bad input: usage errors, a corrupt or inconsistent file, a bad config value, a bad
       JSONL line (ValueError)
  3    a path that does not exist (FileNotFoundError, NotADirectoryError)
  4    the output exists (FileExistsError: pass --overwrite or choose another path)
  5    another operating-system error (permission denied, disk full: OSError), or out of memory (XLA's
       RESOURCE_EXHAUSTED)
  6    an optional dependency is missing (torch / transformers: the message names the extra to install)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM): finetune saved a checkpoint; rerun with --resume
  70   a bug in phi_jax: the traceback is printed; please report it
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

COMMANDS = ("parity", "generate", "convert", "check", "finetune")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_EXISTS, EXIT_OS, EXIT_MISSING_EXTRA = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED, EXIT_BUG = 130, 70

_EXTRAS = {"torch": "torch", "transformers": "parity"}  # module -> the extra that installs it


def exit_code(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an exception caused by the user's input; None for a bug."""
    from phi_jax.errors import MissingExtraError
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, MissingExtraError):
        return EXIT_MISSING_EXTRA, str(exc)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in _EXTRAS:
        root = exc.name.split(".")[0]
        return EXIT_MISSING_EXTRA, (f"{root} is not installed and this needs it; install it with: "
                                    f"pip install 'phi_jax[{_EXTRAS[root]}]'")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return EXIT_NOT_FOUND, _message(exc)
    if isinstance(exc, FileExistsError):
        return EXIT_EXISTS, _message(exc)
    if isinstance(exc, OSError):
        return EXIT_OS, _message(exc)
    if isinstance(exc, RuntimeError) and str(exc).startswith("RESOURCE_EXHAUSTED"):  # jax.errors.JaxRuntimeError
        return EXIT_OS, (f"out of memory ({str(exc).splitlines()[0].strip()}); try a smaller batch or sequence "
                         f"length")
    if isinstance(exc, ValueError):
        return EXIT_USAGE, _message(exc)
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"  # open()'s errors: "No such file or directory: x"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n"))  # exactly one line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, the same shape as every other error
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    from phi_jax.cli.common import add_compile_cache_arguments
    parser = _Parser(prog="phi-jax", description="Phi language models in JAX / Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        module = importlib.import_module(f"phi_jax.cli.{name}")
        modules[name] = module
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        if getattr(module, "COMPILES", False):
            add_compile_cache_arguments(p)
    return parser, modules


def run_command(run, args) -> int:
    """Calls `run(args)` under the error policy above (and the compile cache, when args carry it)."""
    from phi_jax.cli.common import compile_cache
    try:
        with compile_cache(args):
            return run(args)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001  (mapped or reported as a bug below)
        mapped = exit_code(exc)
        if mapped is None:
            traceback.print_exc()
            print(f"error: internal error in phi_jax ({type(exc).__name__}); please report it with the "
                  f"traceback above", file=sys.stderr)
            return EXIT_BUG
        sys.stdout.flush()
        print(f"error: {mapped[1]}", file=sys.stderr)
        return mapped[0]


def main(argv=None) -> int:
    parser, modules = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    return run_command(modules[args.command].run, args)


if __name__ == "__main__":
    sys.exit(main())
