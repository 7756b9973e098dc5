"""``OptimizerSet``: the optimizers of one model, driven by the training loop as one unit.

The optimizer slot's technique groups parameters and returns one of these. The loop only ever calls
``zero_grad``, ``set_lr_scale``, ``before_step``, ``step`` and the state-dict pair, so schedules and
checkpointing work the same for any optimizer technique.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OptimizerSet:
    syncs_gradients = False
    """True when ``step`` averages the gradients across ranks itself (Parallel Muon); the model is then not
    wrapped in DDP."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], grad_clip_norm: float = 0.0) -> None:
        self.optimizers = optimizers
        self.grad_clip_norm = grad_clip_norm
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr_scale(self, scale: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale

    def before_step(self, step: int) -> None:
        """Per-step hyperparameter updates other than the LR multiplier (e.g. momentum warmup)."""

    def step(self, model: nn.Module) -> None:
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)
