"""LN scale: multiply each block's RMSNorm outputs by ``1/sqrt(layer + 1)`` (0-based layer index).

From the #315 record (``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``, PR #315), kept by PRs #400
and #450: damps the input of deeper blocks. A plain Python float per block, no parameters.
"""

from __future__ import annotations

import math

import attrs

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class LnScaleParams:
    """No parameters: the factor is 1/sqrt(layer + 1)."""


class LnScale:
    def transform(self, spec, layers, name) -> None:
        for i in layers:
            spec.claim("residual", i, "ln_scale", 1.0 / math.sqrt(i + 1), by=name)


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
