"""Hessian-aware SDClip: SDClip's ``k`` modulated per row by a Hessian-weighted row magnitude (PR #1412,
``HESSIAN_CLIP_LAMBDA=0.175``).

As the record's ``gptq_quantize_weight`` computes it, with ``H`` the *damped* Hessian (dead diagonal entries set
to 1, then ``+ damp·mean(diag H)``; the record reads it back from the permuted matrix, the same values)::

    c_j = max(H_jj, 1e-8) / mean_j(max(H_jj, 1e-8))          # column importance
    r_i = mean_j(|W_ij| · c_j);  r_i /= mean_i(r_i)         # row importance, mean 1
    s_i = k · std(W_i) · (1 + λ (r_i - 1)) / clip_range      # then clamp_min(1e-10), fp16

``λ = 0`` is plain SDClip. Everything else (categories, bits, GPTQ, routing) is ``sdclip``'s; the multiplier
applies to every GPTQ'd tensor (the tied embedding included), as in the record.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from pgolf_core.config.fields import non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.quantizer.sdclip import SDClipGPTQ, SDClipParams


@attrs.define(frozen=True, kw_only=True)
class HessianSDClipParams(SDClipParams):
    hessian_clip_lambda: float = param(0.175, help="λ: weight of the row importance in the clip (0 = plain SDClip)", env="HESSIAN_CLIP_LAMBDA", validator=non_negative)


def row_importance_multipliers(w: Tensor, H: Tensor, lam: float, damp: float = 0.01) -> Tensor:
    """``1 + λ (r_i - 1)`` per row of ``w`` (R, C) for the Hessian ``H`` (C, C), undamped as collected."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * H.diag().mean())
    diag = torch.diag(H).clamp_min(1e-8)
    col = diag / diag.mean()
    row = (w.float().abs() * col.unsqueeze(0)).mean(dim=1)
    row = row / row.mean()
    return 1.0 + lam * (row - 1.0)


class HessianSDClipGPTQ(SDClipGPTQ):
    """``sdclip`` with ``row_clip_multipliers`` from the Hessian diagonal."""

    def row_clip_multipliers(self, name: str, w: Tensor, H: Tensor) -> Tensor | None:
        lam = self.params.hessian_clip_lambda
        return row_importance_multipliers(w, H, lam, self.params.damp) if lam > 0 else None


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="hessian_sdclip",
            slot="quantizer",
            params=HessianSDClipParams,
            build=lambda params, ctx: HessianSDClipGPTQ(params),
            summary="SDClip GPTQ with k modulated per row by Hessian-weighted row magnitude, lambda 0.175 (PR #1412)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-06_SP8192_HessianSDClip_ProgressiveRecurrence",
            example='[quantizer]\nuse = "hessian_sdclip"\nhessian_clip_lambda = 0.175',
        )
    )
