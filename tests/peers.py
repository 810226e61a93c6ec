"""Importing the peer libraries the compat tests compare against."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def deepctr_sequence_module():
    """deepctr_torch.layers.sequence, or skip when deepctr-torch is not installed.

    deepctr_torch/__init__.py starts a thread that asks PyPI for the latest
    version (requests.get without a timeout, which can hold the test process
    open on a firewalled machine); the layers do not need it, so the package
    is entered without running its __init__.
    """
    if "deepctr_torch" not in sys.modules:
        spec = importlib.util.find_spec("deepctr_torch")
        if spec is None:
            pytest.skip("deepctr-torch is not installed (pip install --no-deps deepctr-torch)")
        package = types.ModuleType("deepctr_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["deepctr_torch"] = package
    return importlib.import_module("deepctr_torch.layers.sequence")
