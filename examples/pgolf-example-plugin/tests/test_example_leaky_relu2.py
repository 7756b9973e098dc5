"""The example plugin's tests, written only against pgolf's public testing helpers (pgolf.testing)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pgolf_example_plugin.leaky_relu2 as plugin
import pytest
import torch
import torch.nn.functional as F

from pgolf.testing import check_technique_contract, fresh_registry, tiny_stack
from pgolf_core.model.gpt import build_model

STACK = Path(__file__).resolve().parent.parent / "stacks" / "sample_leaky.toml"


@pytest.fixture
def registry(pgolf_registry):
    """The built-ins plus this plugin only: other installed plugins cannot change what these tests see."""
    pgolf_registry.add_plugin(plugin, distribution="pgolf-example-plugin", version="test")
    return pgolf_registry


def test_meets_the_pgolf_technique_contract(registry):
    check_technique_contract(registry, registry.get("mlp", "leaky_relu2"))


def test_forward_is_leaky_relu_squared_then_projection():
    torch.manual_seed(0)
    mlp = plugin.LeakyRelu2MLP(8, 16, negative_slope=0.5)
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(2, 3, 8)
    h = x @ mlp.fc.weight.T
    expected = (torch.where(h > 0, h, 0.5 * h) ** 2) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_slope_zero_is_the_baseline_relu2(registry, pgolf_tiny_stack):
    leaky = pgolf_tiny_stack('mlp={use="leaky_relu2", negative_slope=0.0}', registry=registry)
    base = pgolf_tiny_stack(registry=registry)
    torch.manual_seed(0)
    a, _ = build_model(leaky, registry)
    torch.manual_seed(0)
    b, _ = build_model(base, registry)
    x = torch.randint(0, 1024, (2, 16))
    torch.testing.assert_close(a(x, x), b(x, x))


def test_negative_inputs_keep_a_gradient():
    mlp = plugin.LeakyRelu2MLP(4, 8, negative_slope=0.5)
    torch.nn.init.ones_(mlp.proj.weight)
    x = -torch.ones(1, 1, 4)
    torch.nn.init.ones_(mlp.fc.weight)
    mlp(x).sum().backward()
    assert mlp.fc.weight.grad.abs().sum() > 0
    relu = F.relu(x @ mlp.fc.weight.T)
    assert relu.abs().sum() == 0  # where relu² would have no gradient at all


def test_width_follows_mult(registry):
    stack = tiny_stack(registry, "mlp.use='leaky_relu2'", "mlp.mult=3.0")
    model, _ = build_model(stack, registry)
    assert model.blocks[0].mlp.fc.out_features == 3 * stack.model.model_dim


def test_bad_slope_is_a_one_line_config_error(registry):
    from pgolf_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mlp.negative_slope: negative_slope must be in \[0.0, 1.0\], got 2.0"):
        tiny_stack(registry, "mlp.use='leaky_relu2'", "mlp.negative_slope=2.0")


def test_shipped_stack_uses_the_technique():
    from pgolf_core.config import load_stack

    registry = fresh_registry(plugin, distribution="pgolf-example-plugin")
    stack = load_stack(STACK, registry)
    assert stack.technique("mlp") == "leaky_relu2" and stack.params("mlp").negative_slope == 0.5
    assert stack.data.path == "sample:sp1024" and stack.requires == ("pgolf-example-plugin>=0.1",)


def test_installed_package_exposes_the_entry_point():
    (ep,) = [ep for ep in md.entry_points(group="pgolf") if ep.value == "pgolf_example_plugin.leaky_relu2"]
    assert ep.dist is not None and ep.dist.name.replace("_", "-") == "pgolf-example-plugin"
