"""Focal loss: ``mean((1 - p_t)^gamma * CE_t)`` with ``p_t = exp(-CE_t)`` (not detached), in fp32.

From PR #1319 (``FOCAL_GAMMA=1.0``). Its script also used the focal loss for the periodic validation and the
pre-quantization diagnostic (``in_eval``), so the ``val_bpb`` printed there is not CE-based; it rebuilt the
round-trip model without it, so the final scores are plain CE (``prepare_final_eval``).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class FocalParams:
    gamma: float = param(1.0, help="focal exponent; 0 is plain cross-entropy", env="FOCAL_GAMMA", validator=non_negative)
    in_eval: bool = param(True, help="also score periodic validation and the pre-quantization diagnostic with it (PR #1319)")


class FocalLoss(nn.Module):
    def __init__(self, gamma: float, in_eval: bool) -> None:
        super().__init__()
        self.gamma = gamma
        self.in_eval = in_eval  # Python flags: the compiled graph specialises on them

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.gamma > 0 and (self.training or self.in_eval):
            ce = F.cross_entropy(logits.float(), targets, reduction="none")
            return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()
        return F.cross_entropy(logits.float(), targets, reduction="mean")

    def prepare_final_eval(self) -> None:
        """The final scores are cross-entropy: PR #1319 rebuilt its round-trip model without focal loss."""
        self.in_eval = False


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="focal",
            slot="loss",
            params=FocalParams,
            build=lambda params, ctx: FocalLoss(params.gamma, params.in_eval),
            summary="focal loss (1 - p_t)^gamma * CE, also in periodic validation; final scores plain CE (PR #1319)",
            source="https://github.com/openai/parameter-golf/pull/1319",
            example='[loss]\nuse = "focal"\ngamma = 1.0',
        )
    )
