"""The catalogue and composition: entry points, provenance, duplicates, broken plugins, modifiers."""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch

import fake_plugins
from conftest import tiny_stack
from pgolf_core.errors import ConfigError
from pgolf_core.hookspecs import SINGLE_SLOTS
from pgolf_core.model.gpt import build_model
from pgolf_core.registry import Registry, Technique
from pgolf.plugins.compressor.zlib import ZlibParams


def test_builtins_come_from_entry_points_with_provenance(registry):
    for slot in SINGLE_SLOTS:
        assert registry.names(slot), f"no built-in technique for slot {slot}"
    reg = registry.get("optimizer", "muon")
    assert reg.distribution == "pgolf" and reg.version and reg.module == "pgolf.plugins.optimizer.muon"
    eps = {ep.value for ep in md.entry_points(group="pgolf")}
    assert {r.module for r in registry.all()} <= eps


def test_duplicate_name_names_both_distributions():
    reg = Registry()
    tech = Technique(name="dup", slot="compressor", params=ZlibParams, build=lambda p, c: None, summary="x")

    import types

    from pgolf_core.hookspecs import hookimpl

    def impl(register):
        register(tech)

    plugin_a, plugin_b = types.ModuleType("plug_a"), types.ModuleType("plug_b")
    plugin_a.pgolf_register_techniques = plugin_b.pgolf_register_techniques = hookimpl(impl)
    reg.add_plugin(plugin_a, distribution="pgolf-a", version="1.0")
    with pytest.raises(ConfigError, match="by pgolf-a 1.0 .* and by pgolf-b 2.0"):
        reg.add_plugin(plugin_b, distribution="pgolf-b", version="2.0")


def test_broken_plugin_is_recorded_and_skipped(monkeypatch):
    class BrokenEP:
        name, group, value = "broken", "pgolf", "pgolf_missing_module"

        class dist:
            name, version = "pgolf-broken", "0.3.0"

        def load(self):
            raise ModuleNotFoundError("No module named 'flash_attn_interface'")

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group: [*real(group=group), BrokenEP()])
    reg = Registry()
    reg.load_entry_points()
    assert reg.get("optimizer", "muon") is not None
    (failure,) = reg.failures
    assert failure.distribution == "pgolf-broken 0.3.0" and "flash_attn_interface" in failure.error


def test_technique_for_an_unknown_slot_is_refused():
    with pytest.raises(ValueError, match="unknown slot 'optimiser'"):
        Technique(name="x", slot="optimiser", params=ZlibParams, build=lambda p, c: None, summary="x")


@pytest.fixture
def test_registry(registry):
    if not any(r.distribution == "local:fake_plugins" for r in registry.all()):
        registry.add_plugin(fake_plugins, distribution="local:fake_plugins")
    return registry


def test_modifier_claims_reach_the_builder_of_selected_layers(test_registry):
    stack = tiny_stack(test_registry, 'attention.use="gqa_scaled"', 'modifier=[{use="scale_attn", layers="last 2", factor=3.0}]')
    model, _ = build_model(stack, test_registry)
    assert [b.attn.out_scale for b in model.blocks] == [1.0, 1.0, 3.0, 3.0]


def test_modifiers_apply_in_stack_file_order(test_registry):
    stack = tiny_stack(
        test_registry,
        'modifier=[{use="set_mlp_mult", layers="all", mult=3.0}, {use="set_mlp_mult", layers=[0], mult=1.0}]',
    )
    model, objects = build_model(stack, test_registry)
    assert [b.mlp.fc.out_features for b in model.blocks] == [64, 192, 192, 192]
    assert len(objects) == 2


def test_two_modifiers_setting_one_option_conflict(test_registry):
    stack = tiny_stack(
        test_registry,
        'attention.use="gqa_scaled"',
        'modifier=[{use="scale_attn", layers="last 2"}, {use="scale_attn", layers=[2]}]',
    )
    with pytest.raises(ConfigError, match=r"modifiers 'modifier\[0\]\(scale_attn\)' and 'modifier\[1\]\(scale_attn\)' both set 'out_scale' on layer 2 attention"):
        build_model(stack, test_registry)


def test_option_the_chosen_technique_does_not_read_is_an_error(test_registry):
    stack = tiny_stack(test_registry, 'modifier=[{use="scale_attn", layers="all"}]')
    with pytest.raises(ConfigError, match=r"blocks.0.attention uses 'gqa', which does not support option 'out_scale' set by modifier\[0\]\(scale_attn\) \(it offers: heads_out, out, qkv, rotary\)"):
        build_model(stack, test_registry)


def test_same_seed_same_weights(registry):
    stack = tiny_stack(registry)
    torch.manual_seed(0)
    a, _ = build_model(stack, registry)
    torch.manual_seed(0)
    b, _ = build_model(stack, registry)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_technique_built_for_another_hook_version_is_refused_with_its_name():
    import types

    from pgolf_core.hookspecs import hookimpl

    def impl(register):
        register(Technique(name="old", slot="compressor", params=ZlibParams, build=lambda p, c: None, summary="x", hookspec_version=0))

    plugin = types.ModuleType("plug_old")
    plugin.pgolf_register_techniques = hookimpl(impl)
    reg = Registry()
    reg.add_plugin(plugin, distribution="pgolf-old", version="0.1")
    assert reg.get("compressor", "old") is None
    (failure,) = reg.failures
    assert failure.distribution == "pgolf-old 0.1" and "targets hook version 0" in failure.error
