"""Plugin controls: autoload on/off, allow and block lists by distribution, --plugin, hook tracing, failures."""

from __future__ import annotations

import json
import sys
import types

import pytest
from conftest import STACKS, run_cli

import pgolf_core.registry as registry_module
from pgolf_core.cli import main
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Registry, default_registry

PLUGIN = '''
import attrs
from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.compressor.zlib import Zlib


@attrs.define(frozen=True, kw_only=True)
class Params:
    level: int = param(6, help="zlib level", env="FAKE_LEVEL")


@hookimpl
def pgolf_register_techniques(register):
    register(Technique(name="{name}", slot="compressor", params=Params, build=lambda p, ctx: Zlib(p.level), summary="test compressor",
                       source="https://github.com/openai/parameter-golf/pull/1", requires={requires}, conflicts={conflicts},
                       example='[compressor]\\nuse = "{name}"\\nlevel = 6'))
'''


def make_dist(root, dist="pgolf-fake", version="0.2.0", module="pgolf_fake_plugin", name="fake_zlib", body=None, requires=(), conflicts=()):
    """An installed distribution on disk: a module plus a .dist-info with a 'pgolf' entry point."""
    (root / f"{module}.py").write_text(body if body is not None else PLUGIN.format(name=name, requires=tuple(requires), conflicts=tuple(conflicts)))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[pgolf]\n{name} = {module}\n")
    return root


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """pgolf-fake 0.2.0 installed on sys.path, and a process-wide registry that will be rebuilt."""
    make_dist(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_module, "_DEFAULT", None)
    for var in ("PGOLF_DISABLE_PLUGIN_AUTOLOAD", "PGOLF_LOAD_PLUGINS", "PGOLF_BLOCK_PLUGINS", "PGOLF_TRACE_HOOKS"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    sys.modules.pop("pgolf_fake_plugin", None)


def test_installed_plugins_autoload_with_provenance(fake_dist):
    reg = default_registry().get("compressor", "fake_zlib")
    assert (reg.distribution, reg.version, reg.module) == ("pgolf-fake", "0.2.0", "pgolf_fake_plugin")
    assert default_registry().get("compressor", "zlib") is not None


@pytest.mark.parametrize(
    "env, loaded",
    [
        ({"PGOLF_DISABLE_PLUGIN_AUTOLOAD": "1"}, False),
        ({"PGOLF_LOAD_PLUGINS": "pgolf-other"}, False),
        ({"PGOLF_LOAD_PLUGINS": "pgolf-other, pgolf-fake"}, True),
        ({"PGOLF_BLOCK_PLUGINS": "pgolf-fake"}, False),
        ({"PGOLF_BLOCK_PLUGINS": "pgolf-other"}, True),
    ],
)
def test_autoload_controls_by_distribution(fake_dist, monkeypatch, env, loaded):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    registry = default_registry()
    assert (registry.get("compressor", "fake_zlib") is not None) is loaded
    assert registry.get("compressor", "zlib") is not None  # built-ins are never switched off


def test_trace_hooks_prints_every_hook_call(fake_dist, monkeypatch, capsys):
    monkeypatch.setenv("PGOLF_TRACE_HOOKS", "1")
    registry = default_registry()

    class Observer:
        @hookimpl
        def pgolf_on_step_end(self, state):
            pass

    registry.add_plugin(Observer(), distribution="local:observer", name="observer")
    registry.pm.hook.pgolf_on_step_end(state=types.SimpleNamespace(step=7))
    err = capsys.readouterr().err
    assert "pgolf-trace: hook pgolf_register_techniques(register<method>) -> pgolf-fake:fake_zlib" in err
    assert "pgolf-trace: hook pgolf_on_step_end(state<step 7>) -> observer" in err


def test_trace_reports_a_failing_hook_and_can_be_undone():
    registry, lines = Registry(), []
    undo = registry.trace_hooks(lines.append)

    class Broken:
        @hookimpl
        def pgolf_on_train_end(self, state):
            raise RuntimeError("tracker offline")

    registry.add_plugin(Broken(), distribution="local:broken", name="broken")
    with pytest.raises(RuntimeError):
        registry.pm.hook.pgolf_on_train_end(state=object())
    assert lines[-2:] == ["hook pgolf_on_train_end(state<object>) -> broken", "hook pgolf_on_train_end raised RuntimeError: tracker offline"]
    undo()
    registry.pm.hook.pgolf_on_step_end(state=object())
    assert len(lines) == 2


def test_trace_from_the_command_line(tmp_path):
    proc = run_cli(["list", "--slot", "mlp"], tmp_path, env={"PGOLF_TRACE_HOOKS": "1"})
    assert proc.returncode == 0
    assert "pgolf-trace: hook pgolf_register_techniques(register<method>) -> pgolf:relu2_mlp" in proc.stderr


def test_local_plugin_module_from_pythonpath(tmp_path, fake_dist, capsys):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "my_local_tech.py").write_text(PLUGIN.format(name="local_zlib", requires=("zlib_level",), conflicts=("zstd",)))
    sys.path.insert(0, str(tmp_path / "mods"))
    try:
        assert main(["show", "local_zlib", "--plugin", "my_local_tech"]) == 0
        out = capsys.readouterr().out
        assert main(["list", "--slot", "compressor", "--plugin", "my_local_tech"]) == 0
        listed = capsys.readouterr().out
    finally:
        sys.path.remove(str(tmp_path / "mods"))
        sys.modules.pop("my_local_tech", None)
    assert "local_zlib  (slot compressor; local:my_local_tech" in out
    assert "requires: zlib_level" in out and "conflicts: zstd" in out
    assert "level: int = 6  zlib level [legacy env FAKE_LEVEL]" in out
    assert 'example:\n    [compressor]\n    use = "local_zlib"' in out
    assert "source: https://github.com/openai/parameter-golf/pull/1" in out
    assert "local_zlib       local:my_local_tech" in listed


def test_local_plugin_by_file_path_and_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "by_file.py").write_text(PLUGIN.format(name="file_zlib", requires=(), conflicts=()))
    (tmp_path / "in_cwd.py").write_text(PLUGIN.format(name="cwd_zlib", requires=(), conflicts=()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    registry = Registry()
    registry.load_entry_points(allow=set())
    registry.load_module("./by_file.py")
    registry.load_module("in_cwd")  # the console script does not put the working directory on sys.path
    assert registry.get("compressor", "file_zlib").distribution == "local:./by_file.py"
    assert registry.get("compressor", "cwd_zlib").module == "in_cwd"
    sys.modules.pop("in_cwd", None)


def test_unimportable_local_plugin_is_one_line(fake_dist, capsys):
    assert main(["list", "--plugin", "no_such_module_xyz"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --plugin no_such_module_xyz: cannot import: ModuleNotFoundError: No module named 'no_such_module_xyz'"


def test_broken_installed_plugin_is_listed_and_named_when_needed(fake_dist, capsys):
    make_dist(fake_dist, dist="pgolf-broken", version="0.3.0", module="pgolf_broken_plugin", name="broken",
              body="import flash_attn_interface_not_here\n")
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "failed plugin pgolf-broken 0.3.0 (pgolf:broken): ModuleNotFoundError: No module named 'flash_attn_interface_not_here'" in listed
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["failed"] == [{"entry_point": "pgolf:broken", "distribution": "pgolf-broken 0.3.0",
                               "error": "ModuleNotFoundError: No module named 'flash_attn_interface_not_here'"}]
    assert main(["validate", str(STACKS / "sample.toml"), "--set", 'compressor.use="broken"']) == 2
    err = capsys.readouterr().err
    assert "no technique 'broken' for slot 'compressor'" in err
    assert "plugins that failed to load: pgolf-broken 0.3.0 (see 'pgolf list')" in err


def test_plugin_for_another_hook_version_is_refused_by_name(fake_dist, capsys):
    body = PLUGIN.format(name="old_zlib", requires=(), conflicts=()).replace('summary="test compressor"', 'summary="x", hookspec_version=0')
    make_dist(fake_dist, dist="pgolf-old", version="0.1.0", module="pgolf_old_plugin", name="old_zlib", body=body)
    assert main(["list", "--slot", "compressor"]) == 0
    listed = capsys.readouterr().out
    assert "old_zlib  " not in listed
    assert "failed plugin pgolf-old 0.1.0 (pgolf_old_plugin): technique 'old_zlib' targets hook version 0" in listed
    sys.modules.pop("pgolf_old_plugin", None)


def test_list_shows_source_and_json_carries_the_contract(fake_dist, capsys):
    assert main(["list", "--slot", "compressor"]) == 0
    out = capsys.readouterr().out
    assert "source: https://github.com/openai/parameter-golf/pull/315" in out
    assert "fake_zlib        pgolf-fake 0.2.0  test compressor" in out
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    zstd = next(t for t in data["techniques"] if t["name"] == "zstd")
    assert zstd["example"].startswith("[compressor]") and zstd["compile_safe"] is True
    assert zstd["requires"] == [] and zstd["conflicts"] == []
