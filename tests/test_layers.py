"""The import graph keeps the layers of ../shared/DESIGN.md: an import only ever points down, and there is no cycle;
and every module has a name of its own.

Layers, bottom to top: phi1_jax/kernels/, phi1_jax/, phi1_jax/evals/, phi1_jax/data_gen/, phi1_jax/bench/ (the
benchmarks, which measure any of the others and which nothing imports). Every import counts, lazy ones inside
functions too (a lazy import upwards is still a dependency upwards)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
LAYERS = ["phi1_jax.kernels", "phi1_jax", "phi1_jax.evals", "phi1_jax.data_gen", "phi1_jax.bench"]


def _layer(module: str) -> int:
    """The layer of a module: its sub-package's, or the core's (`phi1_jax` itself and its top-level modules)."""
    subs = [i for i, name in enumerate(LAYERS) if name != "phi1_jax" and (module + ".").startswith(name + ".")]
    return subs[0] if subs else LAYERS.index("phi1_jax")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (`from pkg import sub` counts as importing the submodule, not the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = submodules or [node.module]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / "phi1_jax").rglob("*.py")}
    modules = set(files)
    return {m: _imports(p, modules) - {m} for m, p in files.items()}


def test_imports_only_point_down():
    graph = _graph()
    up = [(m, d) for m, deps in graph.items() for d in deps
          if _layer(d) > _layer(m)]
    assert not up, f"imports from a lower layer to a higher one: {sorted(up)}"
    assert graph["phi1_jax.data"] and "phi1_jax.data_gen.shards" not in graph["phi1_jax.data"]  # the walk sees real imports
    assert {_layer("phi1_jax.kernels.flash_attention"), _layer("phi1_jax.model"), _layer("phi1_jax.evals.tasks"),
            _layer("phi1_jax.data_gen.dedup"), _layer("phi1_jax.bench.train_speed")} == {0, 1, 2, 3, 4}


def test_every_module_has_a_name_of_its_own():
    """No two modules share a name, and none is named like a standard-library module (a phi1_jax/inspect.py made
    `import jax` fail for any Python started inside phi1_jax/, where the folder comes first on sys.path)."""
    names = {}
    for path in (ROOT / "phi1_jax").rglob("*"):
        if path.name in ("__init__.py", "__main__.py") or path.name.startswith((".", "__")):
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            names.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    stdlib = sorted(n for n in names if n in sys.stdlib_module_names)
    assert not stdlib, f"named like a standard-library module: {[names[n] for n in stdlib]}"
    shared = {n: paths for n, paths in names.items() if len(paths) > 1}
    assert not shared, f"modules that share a name: {shared}"


def test_the_inspect_command_keeps_its_name():
    """`python -m phi1_jax.inspect` (an interface) runs phi1_jax/inspect_model.py (phi1_jax.COMMANDS)."""
    r = subprocess.run([sys.executable, "-m", "phi1_jax.inspect", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m phi1_jax.inspect"), r.stderr
    r = subprocess.run([sys.executable, "-m", "phi1_jax.no_such_command"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 1 and "No module named phi1_jax.no_such_command" in r.stderr


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
