"""``pgolf list`` and ``pgolf show`` print the sites and parts a host technique offers (discovered by building it,
for any installed technique) and what a modifier acts on."""

from __future__ import annotations

import json
import types

import attrs
import pytest
import torch
from torch import nn

from pgolf import NO_SITES, SiteBuilder, Technique, hookimpl, param
from pgolf.plugins.attention.gqa import CausalSelfAttention
from pgolf.plugins.residual.resid_mix import ResidMixBlock
from pgolf.testing import fresh_registry
from pgolf_core import registry as registry_module
from pgolf_core.cli import main


@attrs.define(frozen=True, kw_only=True)
class _Params:
    scale: float = param(1.0, help="output scale")


class _GatedMLP(nn.Module):
    SITES = {"gate": "(g (B,T,d)) -> g: the gate, before it multiplies the input"}
    PARTS = {"act": "nn.Module: (h) -> h (default: identity)"}

    def __init__(self, dim: int, sites: SiteBuilder = NO_SITES) -> None:
        super().__init__()
        self.dim = dim
        self.w = nn.Parameter(torch.zeros(dim, dim))
        self.act_part = sites.part("act", self) or nn.Identity()
        self.gate_modules = sites.site("gate", self)

    def forward(self, x):
        g = x @ self.w
        if self.gate_modules is not None:
            g = self.gate_modules(g)
        return self.act_part(g) * x


def _needs_option(params, ctx):
    if ctx.option("width") is None:
        raise ValueError("needs a modifier that sets 'width'")
    return _GatedMLP(ctx.model.model_dim, ctx)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(Technique(name="gated_mlp", slot="mlp", params=_Params, build=lambda p, ctx: _GatedMLP(ctx.model.model_dim, ctx),
                       summary="test host", example='[mlp]\nuse = "gated_mlp"'))
    register(Technique(name="picky_mlp", slot="mlp", params=_Params, build=_needs_option, summary="test host that needs an option",
                       example='[mlp]\nuse = "picky_mlp"'))


@pytest.fixture
def cli(monkeypatch, capsys):
    """``pgolf ...`` in-process against the built-ins plus this module's techniques (the process-wide catalogue
    is swapped for the test, so nothing registered here leaks into other tests)."""
    plugin = types.ModuleType("cli_sites_plugin")
    plugin.pgolf_register_techniques = pgolf_register_techniques
    monkeypatch.setattr(registry_module, "_DEFAULT", fresh_registry(plugin, distribution="pgolf-cli-sites"))

    def run(*argv: str) -> str:
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    return run


def test_show_prints_a_hosts_sites_and_parts_with_where_modules_sit(cli):
    out = cli("show", "gqa")
    assert "  sites [state-dict name of the modules installed there]:" in out
    for site, signature in CausalSelfAttention.SITES.items():
        assert f"    {site}: {signature}  [blocks.{{i}}.attn.{site}.{{technique}}]" in out
    assert f"  parts [state-dict name of the replacement]:\n    rotary: {CausalSelfAttention.PARTS['rotary']}  [blocks.{{i}}.attn.rotary]" in out
    assert out.index("parameters:") < out.index("sites") < out.index("parts") < out.index("example:")
    assert "[blocks.{i}.mlp.hidden_site.{technique}]" in cli("show", "relu2")  # the attribute the host keeps the site in


def test_show_of_a_modifier_says_what_it_acts_on(cli):
    assert "  installs at: attention.heads_out\n" in cli("show", "xsa")
    assert "  replaces: attention.rotary\n" in cli("show", "partial_rope")
    out = cli("show", "value_embedding")
    assert "installs at: attention.qkv" in out and "adds model-level modules: ve_shared" in out
    assert "sets CastedLinear.weight_transform (in attach)" in cli("show", "late_qat")
    assert "sites" not in cli("show", "muon") and "installs" not in cli("show", "muon")


def test_show_discovers_an_installed_hosts_sites_by_building_it(cli):
    out = cli("show", "gated_mlp")
    assert f"    gate: {_GatedMLP.SITES['gate']}  [blocks.{{i}}.mlp.gate_modules.{{technique}}]" in out
    assert f"    act: {_GatedMLP.PARTS['act']}  [blocks.{{i}}.mlp.act_part]" in out
    picky = cli("show", "picky_mlp")
    assert "sites: not discovered: the technique does not build in the sample stack with its example" in picky
    assert "needs a modifier that sets 'width'" in picky


def test_list_json_adds_sites_and_parts(cli):
    data = {t["name"]: t for t in json.loads(cli("list", "--json"))["techniques"]}
    assert data["gqa"]["sites"] == CausalSelfAttention.SITES and data["gqa"]["parts"] == CausalSelfAttention.PARTS
    assert data["resid_mix"]["sites"] == ResidMixBlock.SITES and data["resid_mix"]["parts"] == ResidMixBlock.PARTS
    assert data["gated_mlp"]["sites"] == _GatedMLP.SITES
    assert data["softcap"]["sites"] == {} and data["muon"]["sites"] == {} and data["xsa"]["parts"] == {}
    assert data["picky_mlp"]["sites"] is None and data["picky_mlp"]["parts"] is None  # did not build: unknown, not empty


def test_list_prints_sites_and_parts_under_each_host(cli):
    out = cli("list", "--slot", "residual")
    assert "resid_mix" in out and "\n                   sites: attn_in, mlp_in, attn_gain, mlp_gain; parts: wiring\n" in out
    out = cli("list", "--slot", "mlp")
    assert "sites: hidden\n" in out and "sites: gate; parts: act\n" in out
    assert "sites: ? (does not build in the sample stack; see 'pgolf show picky_mlp')" in out
    assert "sites:" not in cli("list", "--slot", "optimizer")
