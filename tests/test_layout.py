"""The package's layers point one way: no import cycles (imports inside functions count), and the model knows
nothing of checkpoint files, conversion, commands or optax.

Layers, top to bottom: cli -> loading / convert / parity / check -> io -> generation -> modeling / kernels -> config.
The one sanctioned upward edge: `phi_jax/modeling/model.py` imports the two mixins its classes inherit,
`phi_jax.loading.PretrainedMixin` and `phi_jax.generation.mixin.GenerationMixin`, the way transformers' models
inherit a generation mixin; neither mixin module imports a model class, which the cycle check verifies.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "phi_jax"
FORBIDDEN_IN_MODELING = ("phi_jax.io", "phi_jax.convert", "phi_jax.cli", "optax", "phi_jax.loading",
                         "phi_jax.generation", "orbax", "safetensors", "transformers", "torch")
ALLOWED_IN_MODELING = {("phi_jax.modeling.model", "phi_jax.loading"),
                       ("phi_jax.modeling.model", "phi_jax.generation.mixin")}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module name `path` imports, anywhere in the file (functions included), relative ones resolved."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _targets(name: str, path: pathlib.Path, mods) -> set[str]:
    """The imports of `path`, package ones as module names (`from a.b import c` is a.b.c when that is a module,
    else a.b); others as written."""
    out = set()
    for target in _imports(name, path):
        if target.split(".")[0] == "phi_jax":
            while target and target not in mods:
                target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods = _modules()
    return {name: {t for t in _targets(name, path, mods) if t in mods} for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_parser_sees_imports_inside_functions():
    graph = _graph()
    assert "phi_jax.modeling.model" in graph["phi_jax.convert"]  # imported inside model_class()
    assert "phi_jax.io.sources" in graph["phi_jax.loading"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modeling_imports_no_io_convert_cli_or_optax():
    bad, mods = [], _modules()
    for name, path in mods.items():
        if not name.startswith("phi_jax.modeling"):
            continue
        for target in _targets(name, path, mods):
            if (name, target) in ALLOWED_IN_MODELING:
                continue
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN_IN_MODELING):
                bad.append(f"{name} imports {target}")
    assert not bad, bad


def test_io_imports_no_model_loading_or_commands():
    """Checkpoint I/O sits below loading and conversion: the plan gets the model's abstract state passed in."""
    mods = _modules()
    bad = [f"{name} imports {target}" for name, path in mods.items() if name.startswith("phi_jax.io")
           for target in _targets(name, path, mods)
           if target.startswith(("phi_jax.modeling", "phi_jax.loading", "phi_jax.convert", "phi_jax.cli"))]
    assert not bad, bad
