"""Sphinx configuration of minima's documentation: ``make -C docs html`` or ``python -m minima.docs``.

The gallery (``docs/examples/*.py``) is executed at every build, so every example is also a test and every figure in
the site is drawn by the code it documents. ``nitpicky``: a reference that does not resolve is a warning (an error
under ``-W``, as CI builds it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import minima

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the experiments package, documented beside minima
sys.path.insert(0, str(Path(__file__).parent / "_ext"))  # minima_gallery: the gallery's figure scraper
os.environ.setdefault("MPLBACKEND", "Agg")

project = "minima"
author = "the minima developers"
copyright = "2026, the minima developers"
release = version = minima.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.coverage",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_inventories", "_ext", "README.md", "examples/README.txt"]
templates_path = ["_templates"]

nitpicky = True
autosummary_generate = True
autosummary_ignore_module_all = True  # every module documents what it defines; packages do not repeat re-exports
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True,
                           "ignore-module-all": True, "no-value": True}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = False

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 4

# Inventories: the sites' own first; where they cannot be reached (the offline build machine) the copies under
# _inventories — Python's and h5py's objects.inv from Debian's python3.11-doc and python-h5py-doc, and, for PyTorch,
# NumPy, Matplotlib and SciPy, inventories of the names these pages use, written by _inventories/make_inventories.py
# in the sites' URL schemes.
_INV = Path(__file__).parent / "_inventories"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, str(_INV / "python.inv"))),
    "numpy": ("https://numpy.org/doc/stable", (None, str(_INV / "numpy.inv"))),
    "torch": ("https://docs.pytorch.org/docs/stable", (None, str(_INV / "torch.inv"))),
    "h5py": ("https://docs.h5py.org/en/stable", (None, str(_INV / "h5py.inv"))),
    "matplotlib": ("https://matplotlib.org/stable", (None, str(_INV / "matplotlib.inv"))),
    "scipy": ("https://docs.scipy.org/doc/scipy", (None, str(_INV / "scipy.inv"))),
}
intersphinx_timeout = 5

html_theme = "furo"
html_title = f"minima {release}"

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "gallery",
    "filename_pattern": r"/",  # execute every example
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("minima_gallery.figures_in_globals", "matplotlib"),  # ours first: pyplot's are still open
}

coverage_show_missing_items = True
coverage_statistics_to_stdout = True


# ------------------------------------------------------------------------------------------------ references
# Annotations name classes where Python defines them (torch.nn.modules.module.Module) or by a bare name the module
# imported (Path, Module, BNPolicy); the inventories name them where the libraries document them. Before a
# reference is declared missing it is retargeted to that documented name and resolved again.
_PRIVATE = {
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "torch.optim.optimizer.Optimizer": "torch.optim.Optimizer",
    "torch._C.Generator": "torch.Generator",
    "torch.fx.graph_module.GraphModule": "torch.fx.GraphModule",
    "scipy.sparse.linalg._interface.LinearOperator": "scipy.sparse.linalg.LinearOperator",
    "torch.nn.parameter.Parameter": "torch.nn.Parameter",
    "matplotlib.axes._axes.Axes": "matplotlib.axes.Axes",
}
_BARE_EXTERNAL = {
    "Path": "pathlib.Path", "Any": "typing.Any", "Callable": "collections.abc.Callable",
    "Sequence": "collections.abc.Sequence", "Mapping": "collections.abc.Mapping",
    "Iterator": "collections.abc.Iterator", "Iterable": "collections.abc.Iterable", "Module": "torch.nn.Module",
    "Tensor": "torch.Tensor",
    "Figure": "matplotlib.figure.Figure", "Axes": "matplotlib.axes.Axes",
}


def _minima_names() -> dict[str, str]:
    """Each public name defined in a minima module → ``module.name`` (where it is documented)."""
    import importlib
    import pkgutil

    found: dict[str, str] = {}
    for info in pkgutil.walk_packages(minima.__path__, "minima."):
        module = importlib.import_module(info.name)
        assigned = {**getattr(module, "__annotations__", {}), **_defined(module)}  # parsed once per module
        for name, value in list(vars(module).items()):
            if name.startswith("_"):
                continue
            home = getattr(value, "__module__", None)
            if home == info.name or (home in (None, "typing") and name in assigned):
                found.setdefault(name, f"{info.name}.{name}")
    return found


def _defined(module) -> dict[str, None]:
    """Names a module assigns at top level (type aliases and constants included), from its source."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return {}
    return {t.id: None for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


def _retarget(app, env, node, contnode):
    from sphinx.ext.intersphinx import missing_reference

    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    names = app.config._minima_names
    new = _PRIVATE.get(target) or _BARE_EXTERNAL.get(target)
    if new is None and target.startswith("torch.nn.modules.") and "._" not in target:
        new = "torch.nn." + target.rsplit(".", 1)[1]  # torch.nn.modules.conv.Conv2d → torch.nn.Conv2d
    head, _, rest = target.partition(".")
    if new is None and head in names:  # Dataset.describe → minima.data.splits.Dataset.describe
        new = names[head] + (f".{rest}" if rest else "")
    elif new is None and head == "minima" and target.rsplit(".", 1)[1] in names:  # a re-export: minima.data.Placement
        new = names[target.rsplit(".", 1)[1]]
    if new is None and "._" in target and not target.startswith("minima."):
        return contnode  # a library's private class (torch.nn.modules.batchnorm._BatchNorm): no page to link to
    if new is None or new == target:
        return None
    node = node.deepcopy()
    node["reftarget"] = new
    if new.startswith("minima."):
        py = env.domains["py"]
        for role in ("class", "data", "func", "meth", "attr", "obj"):
            found = py.resolve_xref(env, node["refdoc"], app.builder, role, new, node, contnode)
            if found is not None:
                return found
        return None
    return missing_reference(app, env, node, contnode)


def _escape_bars(app, what, name, obj, options, lines) -> None:
    """``|x|`` in a docstring is an absolute value, not a reST substitution: escape bars outside ````literals````."""
    for i, line in enumerate(lines):
        parts = line.split("``")
        lines[i] = "``".join(p if k % 2 else p.replace("|", "\\|") for k, p in enumerate(parts))


def _parseable_signature(app, what, name, obj, options, signature, return_annotation):
    """A dataclass field with a ``default_factory`` shows its default as ``<factory>``, which is not Python: the
    signature would then be split at every comma (``tuple[float, ...]`` included). Show such a default as ``…``."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def setup(app):
    app.config._minima_names = _minima_names()
    app.connect("missing-reference", _retarget, priority=400)
    app.connect("autodoc-process-docstring", _escape_bars)
    app.connect("autodoc-process-signature", _parseable_signature)
