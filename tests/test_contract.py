"""The technique contract, run over every installed technique, and proof that it catches broken ones."""

from __future__ import annotations

import random
import types

import attrs
import pytest
import torch
from torch import Tensor, nn

from pgolf.testing import (
    ContractError,
    check_technique_contract,
    fresh_registry,
    installed_registry,
    tiny_stack,
)
from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.mlp.relu2 import Relu2MLP

INSTALLED = installed_registry()


@pytest.mark.parametrize("registration", INSTALLED.all(), ids=lambda r: f"{r.technique.slot}:{r.technique.name}")
def test_technique_meets_the_contract(registration):
    check_technique_contract(INSTALLED, registration)


def test_every_slot_has_a_technique_under_contract():
    slots = {r.technique.slot for r in INSTALLED.all()}
    assert slots >= {"embedding", "attention", "mlp", "residual", "topology", "head", "init", "optimizer", "schedule",
                     "averaging", "quantizer", "compressor", "evaluator"}


# -- broken techniques, each caught by one check ------------------------------------------------------------
@attrs.define(frozen=True, kw_only=True)
class MultParams:
    mult: float = param(2.0, help="hidden width as a multiple of model_dim")


@attrs.define(kw_only=True)
class MutableParams:
    mult: float = param(2.0, help="hidden width as a multiple of model_dim")


@attrs.define(frozen=True, kw_only=True)
class NoHelpParams:
    mult: float = param(2.0)


class BranchyMLP(Relu2MLP):
    """Reads a tensor value in Python: a graph break under fullgraph compile."""

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.detach().sum() > 0):
            return super().forward(x)
        return super().forward(-x)


class UnusedParamMLP(Relu2MLP):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(dim, hidden)
        self.unused = nn.Parameter(torch.zeros(dim))


class PythonRandomMLP(Relu2MLP):
    """Initialises from Python's RNG, which the run's seed does not cover the same way as torch's."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(dim, hidden)
        with torch.no_grad():
            self.fc.weight.mul_(1.0 + random.random())


class HalfCheckpointedAveraging:
    def export_weights(self, model):
        return model.state_dict()

    def state_dict(self) -> dict:
        return {}


def _mlp(cls):
    return lambda params, ctx: cls(ctx.model.model_dim, int(params.mult * ctx.model.model_dim))


def _plugin(*techniques: Technique) -> types.ModuleType:
    module = types.ModuleType("broken_techniques")

    def register_all(register):
        for t in techniques:
            register(t)

    module.pgolf_register_techniques = hookimpl(register_all)
    return module


def _mlp_technique(name: str, build, params=MultParams, example: str | None = None, **kw) -> Technique:
    example = f'[mlp]\nuse = "{name}"\nmult = 2.0' if example is None else example
    return Technique(name=name, slot="mlp", params=params, build=build, summary="test mlp", example=example, **kw)


@pytest.mark.parametrize(
    "technique, check, message",
    [
        (_mlp_technique("no_example", _mlp(Relu2MLP), example=""), "example", "has no example stanza"),
        (_mlp_technique("wrong_example", _mlp(Relu2MLP), example='[mlp]\nuse = "relu2"'), "example", 'use = "wrong_example"'),
        (_mlp_technique("bad_toml", _mlp(Relu2MLP), example="[mlp\nuse = 1"), "example", "not valid TOML"),
        (_mlp_technique("bad_value", _mlp(Relu2MLP), example='[mlp]\nuse = "bad_value"\nmult = "big"'), "example", "expected float"),
        (_mlp_technique("mutable", _mlp(Relu2MLP), params=MutableParams), "metadata", "must be frozen"),
        (_mlp_technique("no_help", _mlp(Relu2MLP), params=NoHelpParams), "metadata", "has no help text"),
        (_mlp_technique("CamelCase", _mlp(Relu2MLP)), "metadata", "snake_case"),
        (_mlp_technique("branchy", _mlp(BranchyMLP)), "compile", "torch.compile(fullgraph=True) failed"),
        (_mlp_technique("unused_param", _mlp(UnusedParamMLP)), "forward/backward", "without a gradient: blocks.0.mlp.unused"),
        (_mlp_technique("python_random", _mlp(PythonRandomMLP)), "same seed", "two builds with seed 0 differ"),
    ],
    ids=lambda v: v.name if isinstance(v, Technique) else None,
)
def test_contract_catches_a_broken_technique(technique, check, message):
    registry = fresh_registry(_plugin(technique))
    with pytest.raises(ContractError) as info:
        check_technique_contract(registry, registry.get("mlp", technique.name))
    text = str(info.value)
    assert f"technique '{technique.name}' (slot mlp; test:broken_techniques" in text
    assert f": {check}: " in text and message in text, text


def test_graph_breaking_technique_may_declare_itself_not_compile_safe():
    technique = _mlp_technique("branchy_declared", _mlp(BranchyMLP), compile_safe=False)
    registry = fresh_registry(_plugin(technique))
    check_technique_contract(registry, registry.get("mlp", "branchy_declared"))


def test_state_missing_from_the_checkpoint_is_caught():
    """Same seed, same RNG: a tensor kept outside the state_dict only shows when restoring into another build."""

    class SeededHidden(Relu2MLP):
        def __init__(self, dim: int, hidden: int) -> None:
            super().__init__(dim, hidden)
            self.gain = torch.rand(dim) + 0.5

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) + self.gain * self.fc(x).mean(-1, keepdim=True)

    technique = _mlp_technique("seeded_hidden", _mlp(SeededHidden))
    registry = fresh_registry(_plugin(technique))
    with pytest.raises(ContractError, match="state_dict: a fresh build loaded with the state_dict computes a different loss"):
        check_technique_contract(registry, registry.get("mlp", "seeded_hidden"))


def test_object_with_half_a_checkpoint_api_is_caught():
    technique = Technique(
        name="half_ckpt", slot="averaging", params=MultParams, build=lambda p, c: HalfCheckpointedAveraging(),
        summary="test averaging", example='[averaging]\nuse = "half_ckpt"',
    )
    registry = fresh_registry(_plugin(technique))
    with pytest.raises(ContractError, match="averaging .HalfCheckpointedAveraging. defines only one of state_dict/load_state_dict"):
        check_technique_contract(registry, registry.get("averaging", "half_ckpt"))


def test_tiny_stack_uses_the_bundled_sample_and_takes_overrides_and_extra_tables():
    registry = fresh_registry()
    stack = tiny_stack(registry, "model.num_layers=2", extra='[compressor]\nuse = "zstd"\nlevel = 3')
    assert stack.data.path == "sample:sp1024" and stack.data.tokenizer == "sample:sp1024"
    assert stack.model.num_layers == 2
    assert stack.technique("compressor") == "zstd" and stack.params("compressor").level == 3
    assert {r.distribution for r in registry.all()} == {"pgolf"}
