"""Errors a newcomer meets that the config tests do not already cover: requires, conflicts, missing plugins.

Covered elsewhere: unknown stack path, TOML syntax, unknown key, wrong type, unknown technique
(test_config.py); conflicting modifiers on the same layers (test_registry.py); data directory, tokenizer
and vocabulary mismatch (test_data.py); failed plugins (test_workflow_plugins.py).
"""

from __future__ import annotations

import importlib.metadata as md
import types

import attrs
import pytest
from conftest import STACKS

from pgolf.testing import fresh_registry, tiny_stack
from pgolf_core.cli import main
from pgolf_core.config import load_stack
from pgolf_core.config.fields import param
from pgolf_core.config.requires import parse_requirement, release, satisfies
from pgolf_core.errors import ConfigError
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import PluginFailure, Technique
from pgolf.plugins.compressor.zlib import Zlib


@attrs.define(frozen=True, kw_only=True)
class LevelParams:
    level: int = param(6, help="zlib level")


def _registry_with(*techniques: Technique):
    plugin = types.ModuleType("error_techniques")
    plugin.pgolf_register_techniques = hookimpl(lambda register: [register(t) for t in techniques])
    return fresh_registry(plugin, distribution="pgolf-errors")


def _zlib_variant(name: str, **kw) -> Technique:
    return Technique(name=name, slot="compressor", params=LevelParams, build=lambda p, c: Zlib(p.level), summary="test",
                     example=f'[compressor]\nuse = "{name}"', **kw)


def test_unmet_requires_names_both_techniques_and_the_fix():
    registry = _registry_with(_zlib_variant("needs_ema", requires=("ema",)))
    with pytest.raises(ConfigError) as info:
        tiny_stack(registry, 'compressor.use="needs_ema"')
    (problem,) = info.value.problems
    assert problem.endswith("technique 'needs_ema' requires 'ema', which the stack does not use; add it or drop 'needs_ema'")


def test_declared_conflict_names_both_techniques():
    registry = _registry_with(_zlib_variant("not_with_softcap", conflicts=("softcap",)))
    with pytest.raises(ConfigError) as info:
        tiny_stack(registry, 'compressor.use="not_with_softcap"')
    (problem,) = info.value.problems
    assert problem.endswith("techniques 'not_with_softcap' and 'softcap' cannot be combined; drop one")


def _requires(tmp_path, *plugins: str, registry=None, table: str | None = None) -> list[str]:
    path = tmp_path / "needs.toml"
    listed = ", ".join(f'"{p}"' for p in plugins)
    path.write_text(f'schema_version = 1\nextends = "{STACKS / "sample.toml"}"\n\n[requires]\n{table or f"plugins = [{listed}]"}\n')
    with pytest.raises(ConfigError) as info:
        load_stack(path, registry or fresh_registry())
    return info.value.problems


def test_missing_plugin_distribution_says_what_to_install(tmp_path):
    (problem,) = _requires(tmp_path, "pgolf-no-such-plugin>=0.2")
    assert problem == (
        f"{tmp_path / 'needs.toml'}:5: requires.plugins: plugin distribution 'pgolf-no-such-plugin' is not installed; "
        "install it: pip install 'pgolf-no-such-plugin>=0.2'"
    )


def test_outdated_plugin_distribution_says_to_upgrade(tmp_path):
    (problem,) = _requires(tmp_path, "pgolf>=99.0")
    assert f"plugin distribution 'pgolf' {md.version('pgolf')} is installed, the stack needs 'pgolf>=99.0'; pip install -U 'pgolf>=99.0'" in problem


def test_installed_but_not_loaded_points_at_the_controls(tmp_path):
    (problem,) = _requires(tmp_path, "attrs")  # installed, but not a loaded pgolf plugin
    assert "plugin distribution 'attrs'" in problem and "is installed but not loaded; check PGOLF_DISABLE_PLUGIN_AUTOLOAD" in problem


def test_installed_but_failed_to_load_shows_the_error(tmp_path):
    registry = fresh_registry()
    registry.failures.append(PluginFailure("pgolf:x", f"attrs {md.version('attrs')}", "ImportError: no flash attention"))
    (problem,) = _requires(tmp_path, "attrs>=1", registry=registry)
    assert "plugin distribution 'attrs'" in problem and "failed to load: ImportError: no flash attention (see 'pgolf list')" in problem


def test_bad_requirement_and_bad_requires_table(tmp_path):
    (problem,) = _requires(tmp_path, "pgolf >> 1")
    assert problem.endswith("requires.plugins: bad requirement 'pgolf >> 1'; write 'name', 'name>=1.2' or 'name>=1.2,<2'")
    problems = _requires(tmp_path, table='plugin = ["pgolf"]')
    assert any("requires.plugin: unknown key 'plugin' (did you mean 'plugins'?)" in p for p in problems)


def test_satisfied_requirements_pass_and_are_kept_in_the_resolved_stack(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text(f'schema_version = 1\nextends = "{STACKS / "sample.toml"}"\n[requires]\nplugins = ["pgolf>=0.1,<99", "Pgolf"]\n')
    stack = load_stack(path, fresh_registry())
    assert stack.requires == ("pgolf>=0.1,<99", "Pgolf")
    assert main(["config", str(path)]) == 0
    assert '[requires]\nplugins = [\n    "pgolf>=0.1,<99",\n    "Pgolf",\n]' in capsys.readouterr().out


@pytest.mark.parametrize(
    "requirement, version, ok",
    [
        ("x>=0.2", "0.2.0", True), ("x>=0.2", "0.1.9", False), ("x==1.2", "1.2.0", True), ("x!=1.2", "1.2", False),
        ("x<2", "1.99", True), ("x>1,<2", "2.0", False), ("x~=1.4", "1.9", True), ("x~=1.4", "2.0", False),
        ("x~=1.4.2", "1.4.9", True), ("x~=1.4.2", "1.5.0", False), ("x", "0.0.1", True), ("x>=1.0", "1.0rc1", True),
    ],
)
def test_requirement_matching(requirement, version, ok):
    name, clauses = parse_requirement(requirement)
    assert name == "x" and satisfies(release(version), clauses) is ok
