"""Every docstring example in mdafx runs as written (STYLE: examples are doctests)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mdafx

MODULES = sorted(m.name for m in pkgutil.walk_packages(mdafx.__path__, "mdafx.")
                 if not m.name.startswith("mdafx.cli")) + ["mdafx.passes"] + sorted(
    m.name for m in pkgutil.walk_packages(importlib.import_module("mdafx.passes").__path__,
                                          "mdafx.passes."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_examples_exist():
    """The examples this suite runs, so that a refactor cannot silently drop them all."""
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in MODULES)
    assert attempted >= 20
