"""Test helpers for technique authors: a clean catalogue, a tiny stack and model, and the contract every
technique meets.

Installed as a pytest plugin (entry point ``pytest11``), so a plugin package's tests get the fixtures
``pgolf_registry``, ``pgolf_tiny_stack`` and ``pgolf_tiny_model`` without a conftest. The same things are plain
functions for use outside fixtures::

    from pgolf.testing import check_technique_contract, fresh_registry, tiny_model
    import my_package.my_technique as plugin

    def test_contract():
        registry = fresh_registry(plugin)
        check_technique_contract(registry, registry.get("mlp", "my_mlp"))

    def test_my_gate_starts_transparent():
        model, _, stack = tiny_model(fresh_registry(plugin), extra='[[modifier]]\\nuse = "my_gate"')
        ...

``fresh_registry`` never autoloads: other installed plugins cannot change what a test sees (pytest and llm
skip autoload under test for the same reason). The contract is what ``tests/test_contract.py`` runs over
every installed technique; a technique that fails it, or has no ``example`` stanza, fails pgolf's suite.

Modules: ``stacks`` (catalogues, ``tiny_stack``), ``model`` (``tiny_model``, ``tiny_batch``, ``tiny_eval_env``,
``cpu_runtime``, ``build_slot``), ``contract`` (``check_technique_contract``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .contract import MODULE_SLOTS, ContractError, check_technique_contract
from .model import TableBytes, build_slot, cpu_runtime, tiny_batch, tiny_eval_env, tiny_model
from .stacks import TINY_STACK, fresh_registry, installed_registry, registrations_of, tiny_stack

__all__ = [
    "MODULE_SLOTS",
    "TINY_STACK",
    "ContractError",
    "TableBytes",
    "build_slot",
    "check_technique_contract",
    "cpu_runtime",
    "fresh_registry",
    "installed_registry",
    "registrations_of",
    "tiny_batch",
    "tiny_eval_env",
    "tiny_model",
    "tiny_stack",
]


@pytest.fixture
def pgolf_registry() -> Any:
    """A catalogue with only pgolf's built-ins; add your plugin with ``pgolf_registry.add_plugin(module, distribution=...)``."""
    return fresh_registry()


@pytest.fixture
def pgolf_tiny_stack(pgolf_registry: Any) -> Callable[..., Any]:
    """``pgolf_tiny_stack(*overrides, extra=..., registry=...)``: a tiny resolved stack (see ``tiny_stack``)."""

    def make(*overrides: str, extra: str | dict[str, Any] | None = None, registry: Any = None) -> Any:
        return tiny_stack(registry or pgolf_registry, *overrides, extra=extra)

    return make


@pytest.fixture
def pgolf_tiny_model(pgolf_registry: Any) -> Callable[..., Any]:
    """``pgolf_tiny_model(*overrides, extra=..., registry=..., seed=0)``: (model, modifiers, stack) (see ``tiny_model``)."""

    def make(*overrides: str, extra: str | dict[str, Any] | None = None, registry: Any = None, seed: int = 0) -> Any:
        return tiny_model(registry or pgolf_registry, *overrides, extra=extra, seed=seed)

    return make
