"""LN scale: multiply each block's RMSNorm outputs by ``1/sqrt(layer + 1)`` (0-based layer index).

From the #315 record (``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``, PR #315), kept by PRs #400
and #450: damps the input of deeper blocks. A module at the block's ``attn_in`` and ``mlp_in`` sites that
multiplies by a Python float (a constant of the compiled graph); no parameters, and none at layer 0, where
the factor is 1.
"""

from __future__ import annotations

import math

import attrs
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class LnScaleParams:
    """No parameters: the factor is 1/sqrt(layer + 1)."""


class ScaleBy(nn.Module):
    """``h -> h * factor`` on a branch input."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, h: Tensor) -> Tensor:
        return h * self.factor


class LnScale:
    def transform(self, spec, layers, name) -> None:
        for i in layers:
            factor = 1.0 / math.sqrt(i + 1)
            if factor == 1.0:
                continue
            for site in ("attn_in", "mlp_in"):
                spec.install("residual", i, site, lambda host, f=factor: ScaleBy(f), by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="ln_scale",
            slot="modifier",
            params=LnScaleParams,
            build=lambda params, ctx: LnScale(),
            summary="scale block norm outputs by 1/sqrt(layer+1)",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "ln_scale"\nlayers = "all"',
            enable_env="LN_SCALE",
        )
    )
