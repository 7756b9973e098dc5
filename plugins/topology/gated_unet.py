"""Sigmoid-gated U-Net skips: before each decoder block ``x = lerp(w_i * skip, x, sigmoid(g_i))``.

From PR #1089, as the #1218 record runs it (``SKIP_GATES_ENABLED=1``): the baseline's U-Net (``unet``) with one
more control vector per skip, ``skip_gates`` (num_skips, d), zero-initialised, so each decoder input starts as the
even mix ``0.5 x + 0.5 w_i * skip`` instead of the sum ``x + w_i * skip``; the gates learn per channel how much of
the stored encoder output replaces the running stream. ``skip_gates`` is created right after ``skip_weights``
(neither draws from the RNG), trained with the scalars, and kept in fp32/fp16 like the other control tensors.
Every part of ``unet`` (a recurrence ``schedule``, a two-lane ``decoder``) works unchanged: only the skip merge
(``add_skip``) differs.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import control
from pgolf_core.model.sites import NO_SITES, SiteBuilder
from pgolf_core.registry import Technique
from pgolf.plugins.topology.unet import UNetSkips


@attrs.define(frozen=True, kw_only=True)
class GatedUNetParams:
    """No parameters: encoder/decoder split is num_layers // 2, gates start at 0 (sigmoid 0.5)."""


class GatedUNetSkips(UNetSkips):
    def __init__(self, num_layers: int, dim: int, sites: SiteBuilder = NO_SITES) -> None:
        super().__init__(num_layers, dim, sites)
        self.skip_gates = control(nn.Parameter(torch.zeros(self.num_skips, dim, dtype=torch.float32)))

    def add_skip(self, x: Tensor, j: int, skip: Tensor) -> Tensor:
        scaled = self.skip_weights[j].to(dtype=x.dtype)[None, None, :] * skip
        gate = torch.sigmoid(self.skip_gates[j].to(dtype=x.dtype))[None, None, :]
        return torch.lerp(scaled, x, gate)


def build(params: GatedUNetParams, ctx) -> GatedUNetSkips:
    return GatedUNetSkips(ctx.model.num_layers, ctx.model.model_dim, ctx)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="gated_unet",
            slot="topology",
            params=GatedUNetParams,
            build=build,
            summary="U-Net skips merged by a learned sigmoid gate, lerp(w*skip, x, sigmoid(g)), gates zero-init (PR #1089, #1218)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-01_Vocab4096_MLPMult4_WD085",
            example='[topology]\nuse = "gated_unet"',
        )
    )
