"""Write ``torch.inv``, ``numpy.inv``, ``matplotlib.inv`` and ``scipy.inv``: Sphinx inventories (format 2) of the
PyTorch, NumPy, Matplotlib and SciPy names these pages refer to, each pointing where the library's own site documents
it.

The documentation is built where those sites cannot be reached (the project's offline machines). ``conf.py`` asks
each site for its own ``objects.inv`` first and falls back to these files, so on a connected machine the links come
from the real inventories. Run ``python docs/_inventories/make_inventories.py`` after adding a reference to a name
that is not listed below; ``python.inv`` and ``h5py.inv`` are the real inventories, taken from Debian's
``python3.11-doc`` and ``python-h5py-doc`` packages.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).parent

# name → (role, page and anchor relative to the site's root; "$" stands for the name)
TORCH = {
    "torch.Tensor": ("class", "tensors.html#$"),
    "torch.device": ("class", "tensor_attributes.html#$"),
    "torch.dtype": ("class", "tensor_attributes.html#$"),
    "torch.Generator": ("class", "generated/$.html#$"),
    "torch.nn.Module": ("class", "generated/$.html#$"),
    "torch.nn.Parameter": ("class", "generated/torch.nn.parameter.Parameter.html#torch.nn.parameter.Parameter"),
    "torch.nn.Linear": ("class", "generated/$.html#$"),
    "torch.nn.Sequential": ("class", "generated/$.html#$"),
    "torch.nn.Conv2d": ("class", "generated/$.html#$"),
    "torch.nn.BatchNorm2d": ("class", "generated/$.html#$"),
    "torch.optim.Optimizer": ("class", "optim.html#$"),
    "torch.optim.lr_scheduler.LRScheduler": ("class", "generated/$.html#$"),
    "torch.optim.swa_utils.AveragedModel": ("class", "optim.html#$"),
    "torch.utils.data.Dataset": ("class", "data.html#$"),
    "torch.utils.data.DataLoader": ("class", "data.html#$"),
    "torch.fx.GraphModule": ("class", "fx.html#$"),
    "torch.func.functional_call": ("function", "generated/$.html#$"),
}
NUMPY = {
    "numpy.ndarray": ("class", "reference/generated/$.html#$"),
    "numpy.dtype": ("class", "reference/generated/$.html#$"),
    "numpy.random.Generator": ("class", "reference/random/generator.html#$"),
    "numpy.typing.ArrayLike": ("data", "reference/typing.html#$"),
}
MATPLOTLIB = {
    "matplotlib.figure.Figure": ("class", "api/_as_gen/$.html#$"),
    "matplotlib.axes.Axes": ("class", "api/_as_gen/$.html#$"),
}

SCIPY = {
    "scipy.sparse.linalg.LinearOperator": ("class", "reference/generated/$.html#$"),
}


def write(path: Path, project: str, names: dict[str, tuple[str, str]]) -> None:
    """One inventory: the four header lines, then ``name py:role 1 uri -`` per name, zlib-compressed."""
    header = f"# Sphinx inventory version 2\n# Project: {project}\n# Version: stable\n"
    header += "# The remainder of this file is compressed using zlib.\n"
    body = "".join(f"{name} py:{role} 1 {uri.replace('$', name)} -\n" for name, (role, uri) in sorted(names.items()))
    path.write_bytes(header.encode() + zlib.compress(body.encode()))


if __name__ == "__main__":
    write(HERE / "torch.inv", "PyTorch", TORCH)
    write(HERE / "numpy.inv", "NumPy", NUMPY)
    write(HERE / "matplotlib.inv", "Matplotlib", MATPLOTLIB)
    write(HERE / "scipy.inv", "SciPy", SCIPY)
