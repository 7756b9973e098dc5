"""Catalytic residuals: a second learned per-channel gain on each branch, ``x += (scale * gate) * f(x)``.

From PR #450 (``2026-03-22_12L_CatalyticResiduals_BigBigram``): ``attn_gate`` and ``mlp_gate``, ones-init,
created after ``attn_scale``/``mlp_scale``. The function class is unchanged (a product of two gains is one
gain); what changes is the optimisation: each factor gets its own Adam normalisation and weight decay.
"""

from __future__ import annotations

import attrs

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class CatalyticParams:
    """No parameters: one gate vector of model_dim per branch."""


class Catalytic:
    def transform(self, spec, layers, name) -> None:
        for i in layers:
            spec.claim("residual", i, "catalytic", True, by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="catalytic_residuals",
            slot="modifier",
            params=CatalyticParams,
            build=lambda params, ctx: Catalytic(),
            summary="extra ones-init per-channel gates multiplying the attention and MLP branch scales (PR #450)",
            source="https://github.com/openai/parameter-golf/pull/450",
            example='[[modifier]]\nuse = "catalytic_residuals"\nlayers = "all"',
            enable_env="CATALYTIC",
        )
    )
