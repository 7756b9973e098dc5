"""Mean cross-entropy of the logits, in fp32 (official baseline ``train_gpt.py``)."""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class CrossEntropyParams:
    """No parameters."""


class CrossEntropy(nn.Module):
    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, reduction="mean")


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="cross_entropy",
            slot="loss",
            params=CrossEntropyParams,
            build=lambda params, ctx: CrossEntropy(),
            summary="mean cross-entropy in fp32 (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[loss]\nuse = "cross_entropy"',
        )
    )
