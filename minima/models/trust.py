"""The import-trust policy: loading a checkpoint never imports a module the user did not allow.

A model named by an import path (``package.module:factory``) is built only when its module (or a package above
it) is in ``--trust-import`` or ``$MINIMA_TRUSTED_IMPORTS``; naming the model on a command line is that
permission for its own module (:func:`own_import`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

TRUST_ENV = "MINIMA_TRUSTED_IMPORTS"


class ModelSpecError(ValueError):
    """A model name that cannot be built: unknown, not importable, not callable, or not returning a module."""


class UntrustedImportError(ModelSpecError):
    """A model names an import target whose module the user has not allowed (it would run its code)."""


def trusted_modules(extra: Iterable[str] = ()) -> set[str]:
    """Modules a checkpoint may make minima import: ``extra`` (``--trust-import``) and the comma-separated
    ``$MINIMA_TRUSTED_IMPORTS``. A trusted package covers its submodules."""
    env = os.environ.get(TRUST_ENV, "")
    return {m.strip() for m in [*extra, *env.split(",")] if m.strip()}


def check_trusted(name: str, module: str, trusted: Iterable[str]) -> None:
    """Raise :class:`UntrustedImportError` (one line: the model, the module, how to allow it) unless ``module`` is
    trusted (:func:`trusted_modules`)."""
    allowed = trusted_modules(trusted)
    if not any(module == t or module.startswith(t + ".") for t in allowed):
        raise UntrustedImportError(
            f"the model {name!r} would import the module {module!r} and run its code; minima imports a module "
            f"only when you allow it: pass --trust-import {module} (or set {TRUST_ENV}={module}) if you "
            "trust it")


def own_import(name: str) -> tuple[str, ...]:
    """The module a model name given on a command line allows importing (naming it is the permission): the module
    of an import path, nothing for registry and torchvision names."""
    return (name.partition(":")[0],) if ":" in name and not name.startswith("torchvision:") else ()
