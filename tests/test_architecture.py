"""The package's layering (ARCHITECTURE.md): imports only go down, no cycles, every module documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minima"

# Layer of every module, lowest first. A module may import modules of its own layer or below; a command
# imports no other command.
LAYERS = {
    "base": ["__init__", "vocab", "config", "allocator", "distributed", "precision", "cli"],
    "numerics": ["data", "models", "schedule", "evaluate", "fold", "convgrad", "graphcache", "directions",
                 "checkpoint", "objective", "hessian", "sharpness_metrics", "metrics", "results", "plots"],
    "studies": ["training", "sweep", "measure", "planes"],
    "commands": ["train", "interpolate", "sharpness", "plot", "surface"],
}
RANK = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}
LAYER = {module: layer for layer, modules in LAYERS.items() for module in modules}


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _imports(module: str, source: str | None = None) -> set[str]:
    """minima modules imported by ``module`` (anywhere in the file, lazy imports included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text() if source is None else source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minima":
            if node.module == "minima":
                found.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
                if any(not (PACKAGE / f"{a.name}.py").exists() for a in node.names):
                    found.add("__init__")
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("minima."))
    found.discard(module)
    return found


def _third_party(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) == set(RANK), "add new modules to LAYERS here and to ARCHITECTURE.md"


@pytest.mark.parametrize("module", _modules())
def test_imports_only_go_down(module: str) -> None:
    for target in _imports(module):
        assert RANK[target] <= RANK[module], f"{module} ({LAYER[module]}) imports {target} ({LAYER[target]})"
        if LAYER[module] == "commands":
            assert LAYER[target] != "commands", f"command {module} imports command {target}"
    if LAYER[module] in ("numerics", "studies"):
        assert "argparse" not in _third_party(module), f"{module} parses command lines; that is a command's job"
    assert "experiments" not in _third_party(module), f"{module} imports from experiments/"


def test_no_import_cycles() -> None:
    graph = {m: _imports(m) for m in _modules()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_import_parser_finds_every_form() -> None:
    """Plain, aliased, package-level and lazy (in-function) imports are all seen, so the layer test cannot pass
    vacuously."""
    source = ("import minima.results\nfrom minima import data as d, __version__\nfrom minima.sweep import run\n"
              "def f():\n    from minima.train import main\n")
    assert _imports("plots", source) == {"results", "data", "__init__", "sweep", "train"}
    assert {"checkpoint", "data", "distributed", "results"} <= _imports("sweep")


def test_architecture_md_names_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    documented = set(re.findall(r"`minima/(\w+)\.py`", text))
    missing = sorted(set(_modules()) - documented)
    assert not missing, f"ARCHITECTURE.md does not describe {missing}"
    stale = sorted(documented - set(_modules()))
    assert not stale, f"ARCHITECTURE.md describes modules that do not exist: {stale}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__"))
def test_every_experiment_imports(name: str) -> None:
    """Pipelines and benchmarks sit on top of the package: a moved or renamed name breaks them here, not in a
    user's benchmark run."""
    import importlib

    assert callable(importlib.import_module(f"experiments.{name}").main)
