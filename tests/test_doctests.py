"""The examples in the docstrings of small pure functions run, and print what their docstrings say (issue 28)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ("minima.core.vocab", "minima.geometry.permute", "minima.data.sources", "minima.studies.surface",
           "minima.pipelines.zoo", "minima.curvature.registry", "minima.files.sinks", "minima.curvature.hessian")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1, f"{name} has no docstring example"
    assert result.failed == 0
