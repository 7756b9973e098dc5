"""The output gate: its math on tiny tensors, the contract, and a run of the stack that uses it."""

from __future__ import annotations

import torch

import pgolf_attention_gate.output_gate as plugin
from pgolf.testing import check_technique_contract, fresh_registry, tiny_batch, tiny_model

GATED = '[[modifier]]\nuse = "attention_output_gate"\nlayers = [1, 3]\nwidth = 4'


def _registry():
    return fresh_registry(plugin, distribution="pgolf-attention-gate")


def test_gate_scales_each_head_by_two_sigmoid():
    torch.manual_seed(0)
    gate = plugin.HeadGate(width=3, num_heads=2)
    assert gate.proj._zero_init  # the init slot zeroes it after every module drew its weights
    torch.nn.init.zeros_(gate.proj.weight)
    y, x = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 8)
    torch.testing.assert_close(gate(y, None, x), y)  # zero W: 2 * sigmoid(0) = 1
    with torch.no_grad():
        gate.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 0.5]]))
    g = 2 * torch.sigmoid(x[..., :3] @ gate.proj.weight.T)
    torch.testing.assert_close(gate(y, None, x), y * g[..., None])


def test_meets_the_pgolf_technique_contract():
    registry = _registry()
    check_technique_contract(registry, registry.get("modifier", "attention_output_gate"))


def test_installs_on_the_selected_layers_and_starts_transparent():
    registry = _registry()
    gated, _, stack = tiny_model(registry, extra=GATED)
    assert [b.attn.heads_out is not None for b in gated.blocks] == [False, True, False, True]
    gate = gated.blocks[1].attn.heads_out["attention_output_gate"]
    assert tuple(gate.proj.weight.shape) == (stack.model.num_heads, 4) and not gate.proj.weight.any()
    x, y = tiny_batch(stack)
    with torch.no_grad():
        loss = gated(x, y)
        sites = [b.attn.heads_out for b in gated.blocks]
        for b in gated.blocks:
            b.attn.heads_out = None
        torch.testing.assert_close(gated(x, y), loss)  # the gates start at 1: the same model without them
        for b, site in zip(gated.blocks, sites):
            b.attn.heads_out = site
    with torch.no_grad():  # the zero-initialised output projection would hide every head from the loss
        gated.blocks[1].attn.proj.weight.normal_(std=0.1)
    gated(x, y).backward()
    assert gate.proj.weight.grad.abs().sum() > 0
