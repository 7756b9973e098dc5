"""pgolf: parameter-golf recipes as plugins and stack files.

What a plugin author needs is importable from here (``from pgolf import Technique, hookimpl, param``); the
names resolve lazily, so ``import pgolf`` stays cheap. ``python -m pgolf …`` / ``torchrun -m pgolf run STACK``
run the CLI; ``pgolf.plugins`` holds the built-in techniques and ``pgolf.testing`` the test helpers.

=================  ==========================================================================================
registration       ``hookimpl``, ``Technique``, ``HOOKSPEC_VERSION``
parameters         ``param``, ``positive``, ``non_negative``, ``in_range``, ``one_of``
sites and parts    ``Site``, ``SiteBuilder``, ``NO_SITES`` (a host's constructor default), ``ModifierName``
parameter roles    ``control``, ``frozen``
building blocks    ``CastedLinear``, ``RMSNorm``, ``Rotary``, ``zero_init``
contracts          ``FinalResult``, ``Compliance``, ``Batch`` and the slot/capability protocols in ``contracts``
artifacts          ``ByteCompressor`` (a compressor over the serialized quantized object)
=================  ==========================================================================================
"""

from __future__ import annotations

import importlib
from typing import Any

from pgolf_core import __version__

_EXPORTS = {
    "hookimpl": "pgolf_core.hookspecs",
    "HOOKSPEC_VERSION": "pgolf_core.hookspecs",
    "Technique": "pgolf_core.registry",
    "param": "pgolf_core.config.fields",
    "positive": "pgolf_core.config.fields",
    "non_negative": "pgolf_core.config.fields",
    "in_range": "pgolf_core.config.fields",
    "one_of": "pgolf_core.config.fields",
    "Site": "pgolf_core.model.sites",
    "SiteBuilder": "pgolf_core.model.sites",
    "NO_SITES": "pgolf_core.model.sites",
    "ModifierName": "pgolf_core.model.sites",
    "control": "pgolf_core.model.roles",
    "frozen": "pgolf_core.model.roles",
    "CastedLinear": "pgolf_core.model.layers",
    "RMSNorm": "pgolf_core.model.layers",
    "Rotary": "pgolf_core.model.layers",
    "zero_init": "pgolf_core.model.layers",
    "FinalResult": "pgolf_core.contracts",
    "Compliance": "pgolf_core.contracts",
    "Batch": "pgolf_core.contracts",
    "ByteCompressor": "pgolf_core.artifact",
}

__all__ = ["__version__", "contracts", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "contracts":
        return importlib.import_module("pgolf_core.contracts")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pgolf' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
