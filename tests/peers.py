"""What the compat tests share: importing the peer libraries they compare
against, and a record of the calls an adapter makes to its fused path."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pathlib
import sys
import types

import pytest

from benchmarks.peers import deepctr_module


def _package_without_init(name: str, path) -> None:
    """Register ``name`` as a package at ``path`` without running its __init__."""
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package


def deepctr_sequence_module():
    """deepctr_torch.layers.sequence (entered without the package's __init__,
    see benchmarks.peers.deepctr_module), or skip when deepctr-torch is not
    installed."""
    module = deepctr_module("layers.sequence")
    if module is None:
        pytest.skip("deepctr-torch is not installed (pip install --no-deps deepctr-torch)")
    return module


FUXICTR_VERSION = "2.3.10"
FUXICTR_PACKAGES = ("fuxictr", "fuxictr.pytorch", "fuxictr.pytorch.layers",
                    "fuxictr.pytorch.layers.attentions", "fuxictr.pytorch.layers.blocks")


def import_fuxictr_din_attention(root: pathlib.Path):
    """FuxiCTR's DIN_Attention class from the fuxictr package under ``root``.

    Only the modules DIN_Attention needs are imported: fuxictr's package
    __init__ files pull in polars, pandas and more, which it does not use.
    """
    for name in FUXICTR_PACKAGES:
        _package_without_init(name, root.joinpath(*name.split(".")))
    return importlib.import_module("fuxictr.pytorch.layers.attentions.target_attention") \
        .DIN_Attention


def fuxictr_din_attention():
    """The installed fuxictr's DIN_Attention, or skip when fuxictr is not installed."""
    if "fuxictr" not in sys.modules:
        spec = importlib.util.find_spec("fuxictr")
        if spec is None or importlib.metadata.version("fuxictr") != FUXICTR_VERSION:
            pytest.skip(f"fuxictr {FUXICTR_VERSION} is not installed "
                        f"(pip install --no-deps fuxictr=={FUXICTR_VERSION})")
        return import_fuxictr_din_attention(
            pathlib.Path(spec.submodule_search_locations[0]).parent)
    return importlib.import_module("fuxictr.pytorch.layers.attentions.target_attention") \
        .DIN_Attention


def record_fused_calls(monkeypatch, adapter_module) -> list:
    """The ``activation`` of every din_attention call ``adapter_module`` makes
    from now on (the fused path), appended to the returned list."""
    fused = adapter_module.din_attention
    calls = []

    def recorded(*args, **kwargs):
        calls.append(kwargs["activation"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(adapter_module, "din_attention", recorded)
    return calls
