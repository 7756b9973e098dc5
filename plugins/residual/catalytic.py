"""Catalytic residuals: a second learned per-channel gain on each branch, ``x += (scale * gate) * f(x)``.

From PR #450 (``2026-03-22_12L_CatalyticResiduals_BigBigram``): a ones-init gate per branch at the block's
``attn_gain`` and ``mlp_gain`` sites, created right after ``attn_scale``/``mlp_scale`` as in the reference.
The gates are ordinary weights, not control tensors (the reference's name list does not match them). The
function class is unchanged (a product of two gains is one gain); what changes is the optimisation: each
factor gets its own Adam normalisation and weight decay.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class CatalyticParams:
    """No parameters: one gate vector of model_dim per branch."""


class CatalyticGate(nn.Module):
    """``gain -> gain ⊙ gate`` with a ones-init per-channel gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, gain: Tensor) -> Tensor:
        return gain * self.gate.to(dtype=gain.dtype)[None, None, :]


class Catalytic:
    def transform(self, spec, layers, name) -> None:
        for i in layers:
            for site in ("attn_gain", "mlp_gain"):
                spec.install("residual", i, site, lambda host: CatalyticGate(host.dim), by=name)


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
