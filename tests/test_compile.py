"""Every shipped stack's model compiles with torch.compile(fullgraph=True): no plugin code runs in forward."""

from __future__ import annotations

import pytest
import torch

from conftest import STACKS, tiny_stack
from pgolf_core.model.gpt import build_model
from pgolf_core.model.roles import is_frozen
from pgolf.plugins.topology.recurrence import RecurrenceSchedule

SHIPPED = sorted(STACKS.glob("*.toml"))


def test_stacks_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"baseline", "sample"}


def _fit_layer_lists(path) -> list[str]:
    """Layer selectors of a full-size stack that name layers the tiny 4-layer model lacks (value embeddings on
    [9, 10], parallel blocks from "7:", Canon on the "last 5") moved onto its last layers."""
    from pgolf_core.config import load_stack
    from pgolf_core.config.checks import parse_layers
    from pgolf_core.registry import default_registry

    out = []
    for i, m in enumerate(load_stack(path, default_registry()).modifiers):
        try:
            parse_layers(m.layers, 4)
        except ValueError:
            out.append(f"modifier[{i}].layers=[2, 3]" if isinstance(m.layers, list) else f'modifier[{i}].layers="2:"')
        if getattr(m.params, "loop_end", 0) >= 4:  # segment_recurrence's own range (#1394: 4-5, #1493: 3-5)
            out += [f"modifier[{i}].loop_start=2", f"modifier[{i}].loop_end=3"]
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_stack_model_compiles_fullgraph(registry, path):
    torch._dynamo.reset()
    stack = tiny_stack(registry, *_fit_layer_lists(path), path=path)
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    x = torch.randint(0, stack.model.vocab_size, (2, 16))
    y = torch.randint(0, stack.model.vocab_size, (2, 16))
    eager = model(x, y)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and not is_frozen(p))
    schedule = model.topology.schedule
    if isinstance(schedule, RecurrenceSchedule):  # depth recurrence switched on: one recompile, still one graph
        schedule.active = True
        torch.testing.assert_close(compiled(x, y), model(x, y))
        assert all(s.grad is None or torch.isfinite(s.grad).all() for s in schedule.scales)
