"""Pieces every `phi-jax` command shares: JAX's persistent compilation cache and the tokenizer.

Compilation cache: commands that compile (generate, check, parity, finetune) store XLA programs in a directory, so a
second run of the same command on the same machine compiles nothing. The directory is `--compile-cache DIR`,
else $PHI_JAX_COMPILE_CACHE (`off` or `0` disables it), else JAX's own $JAX_COMPILATION_CACHE_DIR, else
`$XDG_CACHE_HOME/phi_jax/jax-compilation-cache` (`~/.cache/...`); `--no-compile-cache` disables it. Every program is cached, however small or quick to compile.
"""

from __future__ import annotations

import contextlib
import os
import sys

CACHE_ENV = "PHI_JAX_COMPILE_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "phi_jax", "jax-compilation-cache")


def add_compile_cache_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile-cache", metavar="DIR", default=None,
                       help=f"JAX persistent compilation cache directory (default: ${CACHE_ENV}, else "
                            f"$JAX_COMPILATION_CACHE_DIR, else {default_cache_dir()})")
    group.add_argument("--no-compile-cache", action="store_true", help="compile in this process only")


def cache_dir(args) -> str | None:
    """The cache directory `args` select, or None (disabled, or a command that compiles nothing)."""
    if not hasattr(args, "compile_cache") or args.no_compile_cache:
        return None
    if args.compile_cache:
        return os.path.abspath(args.compile_cache)
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else os.path.abspath(env)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX's own setting
        return os.path.abspath(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return default_cache_dir()


_CACHE_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": -1}


@contextlib.contextmanager
def compile_cache(args):
    """Turns JAX's persistent compilation cache on for the `with` block (see the module docstring), then
    restores the previous settings (so a library user calling `main` keeps their own)."""
    path = cache_dir(args)
    if path is None:
        yield None
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache disabled: cannot create {path}: {e.strerror or e}", file=sys.stderr)
        yield None
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    compilation_cache.reset_cache()
    for name, value in _CACHE_OPTIONS.items():
        jax.config.update(name, path if name == "jax_compilation_cache_dir" else value)
    try:
        yield path
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


class CompileEvents:
    """XLA compilations and persistent-cache hits seen inside `compile_events()`."""

    def __init__(self, compilations):
        self._compilations = compilations
        self.cache_hits = 0

    @property
    def compiled(self) -> int:  # programs XLA compiled; jax times a cache hit as a compilation too
        return self._compilations.count - self.cache_hits

    @property
    def seconds(self) -> float:  # tracing, lowering and compiling
        return self._compilations.seconds

    def describe(self) -> str:
        return f"{self.seconds:.2f} s ({self.compiled} programs compiled, {self.cache_hits} loaded from the cache)"


@contextlib.contextmanager
def compile_events():
    import jax

    from phi_jax.compilation import count_compilations
    with count_compilations() as compilations:
        events = CompileEvents(compilations)

        def on_event(event: str, **kwargs) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                events.cache_hits += 1

        jax.monitoring.register_event_listener(on_event)
        try:
            yield events
        finally:
            jax.monitoring.unregister_event_listener(on_event)


def load_tokenizer(path: str, *, option: bool):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a directory holding one (`phi_jax.io.tokenizer`).

    `option`: `path` came from --tokenizer (else it is the model directory, and the error names --tokenizer).
    """
    from phi_jax.io.tokenizer import read_tokenizer
    hint = "" if option else "; pass --tokenizer PATH (a tokenizer.json file or a directory holding one)"
    return read_tokenizer(path, missing_hint=hint)
