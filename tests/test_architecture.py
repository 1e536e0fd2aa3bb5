"""The package's layering (ARCHITECTURE.md), enforced by folder: imports only go down, a command imports no command,
a study imports no other study (only the shared grid runner), argparse only where flags are made, every Literal in
core/vocab.py, no cycles, every module documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minima"

# Layers, lowest first: a folder (every module in it) or a top-level module. A module may import its own layer or a
# lower one.
LAYERS = ["base", "data", "models", "optim", "files", "geometry", "curvature", "figures", "studies", "pipelines",
          "commands"]
FOLDERS = {"core": "base", "data": "data", "models": "models", "optim": "optim", "files": "files",
           "geometry": "geometry", "curvature": "curvature", "studies": "studies",
           "pipelines": "pipelines"}
TOP_LEVEL = {"__init__": "base", "figures": "figures", "train": "commands", "interpolate": "commands",
             "surface": "commands", "sharpness": "commands", "plot": "commands", "align": "commands",
             "curve": "commands", "zoo": "commands"}
# what every study may import besides lower layers: the grid runner, the training loop and its probes
SHARED_STUDY_MODULES = {"studies.grid", "studies.loop", "studies.probing", "studies.__init__"}
ARGPARSE_ALLOWED = {"core.config"}  # flags are generated from requests there; commands parse


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _modules() -> list[str]:
    return sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _layer(module: str) -> str:
    head = module.split(".")[0]
    if "." in module:
        return FOLDERS[head]
    return TOP_LEVEL[head]


def _rank(module: str) -> int:
    return LAYERS.index(_layer(module))


def _exists(dotted: str) -> str | None:
    """The module name of ``minima.<dotted>`` if it is a file or a package, else None."""
    path = PACKAGE.joinpath(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return dotted
    if (path / "__init__.py").is_file():
        return f"{dotted}.__init__"
    return None


def _imports(module: str, source: str | None = None) -> set[str]:
    """minima modules imported by ``module`` (anywhere in the file, lazy imports included)."""
    file = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(file.read_text() if source is None else source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minima":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:
                sub = _exists(f"{base}.{alias.name}" if base else alias.name)
                found.add(sub if sub is not None else (_exists(base) if base else "__init__") or base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minima."):
                    found.add(_exists(alias.name.split(".", 1)[1]) or alias.name.split(".", 1)[1])
    found.discard(module)
    return found


def _third_party(module: str) -> set[str]:
    tree = ast.parse(PACKAGE.joinpath(*module.split(".")).with_suffix(".py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for m in _modules():
        try:
            _layer(m)
        except KeyError:
            unplaced.append(m)
    assert not unplaced, f"put {unplaced} in a layer's folder (or add it to TOP_LEVEL here and to ARCHITECTURE.md)"


@pytest.mark.parametrize("module", _modules())
def test_imports_only_go_down(module: str) -> None:
    for target in _imports(module):
        assert target in set(_modules()), f"{module} imports minima.{target}, which does not exist"
        assert _rank(target) <= _rank(module), (f"{module} ({_layer(module)}) imports {target} "
                                                f"({_layer(target)})")
        if _layer(module) == "commands":
            assert _layer(target) != "commands", f"command {module} imports command {target}"
        if _layer(module) == "studies" and _layer(target) == "studies":
            assert target in SHARED_STUDY_MODULES, (f"study {module} imports study {target}; share code through "
                                                    "studies/grid.py or a lower layer")
    if _layer(module) != "commands" and module not in ARGPARSE_ALLOWED:
        assert "argparse" not in _third_party(module), f"{module} parses command lines; that is a command's job"
    assert "experiments" not in _third_party(module), f"{module} imports from experiments/"


@pytest.mark.parametrize("module", _modules())
def test_every_literal_lives_in_vocab(module: str) -> None:
    if module == "core.vocab":
        return
    tree = ast.parse(PACKAGE.joinpath(*module.split(".")).with_suffix(".py").read_text())
    inline = [n.lineno for n in ast.walk(tree)
              if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "Literal"]
    assert not inline, f"{module} spells a Literal at line(s) {inline}; declare it in minima/core/vocab.py"


def test_no_import_cycles() -> None:
    graph = {m: _imports(m) for m in _modules()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_import_parser_finds_every_form() -> None:
    """Plain, aliased, package-level, submodule and lazy (in-function) imports are all seen, so the layer test
    cannot pass vacuously."""
    source = ("import minima.files.results\nfrom minima import data as d, __version__\n"
              "from minima.files import checkpoint as ck\nfrom minima.studies.interpolate import run\n"
              "def f():\n    from minima.train import main\n")
    assert _imports("figures", source) == {"files.results", "data.__init__", "__init__", "files.checkpoint",
                                           "studies.interpolate", "train"}
    assert {"files.checkpoint", "core.distributed", "files.results", "studies.grid"} <= _imports("studies.interpolate")


def test_the_rules_catch_an_upward_import_and_a_study_importing_a_study(tmp_path: Path) -> None:
    up = _imports("geometry.points", "from minima.studies.grid import run_grid\n")
    assert any(_rank(t) > _rank("geometry.points") for t in up)
    sideways = _imports("studies.surface", "from minima.studies.train import TrainConfig\n")
    assert "studies.train" in sideways and "studies.train" not in SHARED_STUDY_MODULES


def test_architecture_md_names_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    documented = {p.replace("/", ".") for p in re.findall(r"`minima/([\w/]+)\.py`", text)}
    missing = sorted(set(_modules()) - documented)
    assert not missing, f"ARCHITECTURE.md does not describe {missing}"
    stale = sorted(documented - set(_modules()))
    assert not stale, f"ARCHITECTURE.md describes modules that do not exist: {stale}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                                        if not p.stem.startswith("_")))
def test_every_experiment_imports(name: str) -> None:
    """Pipelines and benchmarks sit on top of the package: a moved or renamed name breaks them here, not in a
    user's benchmark run. (``_pipeline.py`` is their shared helper, imported by each.)"""
    import importlib

    assert callable(importlib.import_module(f"experiments.{name}").main)
