"""The public namespaces: every name of ``mdafx.api.__all__`` resolves, and the top-level
``mdafx`` re-exports the same objects (except the two names that are also submodules)."""
from __future__ import annotations

import importlib

import pytest

import mdafx
from mdafx import api


@pytest.mark.parametrize("name", sorted(api.__all__))
def test_every_api_name_resolves(name):
    obj = getattr(api, name)
    assert obj is not None
    if name in mdafx._SUBMODULE_NAMES:
        return
    assert getattr(mdafx, name) is obj and name in dir(mdafx)


def test_late_names_come_from_their_modules():
    for name, module in api._LATE.items():
        assert getattr(api, name) is getattr(importlib.import_module(module), name)
    from mdafx.api import assemble, finetune, search_thresholds  # noqa: F401  (PEP 562 from-import)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mdafx.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        api.nope  # noqa: B018
