"""What a quantizer may use after training: the trained model, the runtime, and (if it must) training data.

Hessian-aware quantizers (GPTQ) need activations. A quantizer that defines ``calibrate(ctx)`` gets a
``CalibrationContext`` before ``quantize`` is called; the phase is timed and logged against the budget that
applies to it. Where the activations come from is a *calibration source*, and each source declares whether
the challenge's rules allow it (``Compliance``): training batches read after the training clock has
stopped are not allowed; sequences the model generates itself are (PR #1019's precedent).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import attrs
import torch
from torch import Tensor, nn


@attrs.define(frozen=True)
class Compliance:
    """One rule check of a technique: ``ok`` and why, in words a reviewer can check."""

    what: str
    ok: bool
    reason: str


@attrs.define
class CalibrationContext:
    model: nn.Module
    """The uncompiled GPT with the exported (averaged) weights loaded; the caller restores train/eval mode."""
    runtime: Any
    """``pgolf_core.runtime.Runtime``: device, ``autocast()``, rank/world size."""
    seed: int
    """The run's seed (``run.seed``)."""
    train_seq_len: int
    vocab_size: int
    log: Callable[..., None]
    train_batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]]
    """``train_batches(n)`` yields ``n`` (inputs, targets) batches from a fresh training-stream loader."""

    def sequential_model(self) -> contextlib.AbstractContextManager:
        """The model with depth recurrence and parallel blocks switched off for the duration (PR #1392 collected
        its Hessians on such a copy)."""
        switch = getattr(self.model, "sequential_view", None)
        return switch() if callable(switch) else contextlib.nullcontext()


def forward_hooks_on_linears(model: nn.Module, fn: Callable[[str, Tensor], None]) -> list[Any]:
    """Register ``fn(weight_name, input_2d)`` on every ``CastedLinear`` of ``model``; returns the handles."""
    from .model.layers import CastedLinear

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            pname = f"{name}.weight"

            def hook(mod, inputs, output, pname=pname):
                x = inputs[0].detach()
                fn(pname, x.reshape(-1, x.shape[-1]))

            handles.append(module.register_forward_hook(hook))
    return handles
