"""relu² MLP: ``proj(relu(fc(x))²)`` with a zero-initialised output projection.

From the official baseline ``train_gpt.py`` (after modded-nanogpt). With ``negative_slope > 0`` it is
PR #493's LeakyReLU(slope)² (``proj(leaky_relu(fc(x), slope)²)``), kept by #549, #1019, #1392 and #1319. The
hidden width is ``int(mult * model_dim)``; the baseline uses an integer multiplier, later records a float one.

Site ``hidden``: ``(h (B,T,hidden), x) -> h`` on the activation, before the square (Canon D).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import in_range, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear, zero_init
from pgolf_core.model.sites import NO_SITES, SiteBuilder
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class Relu2Params:
    mult: float = param(2.0, help="hidden width as a multiple of model_dim", env="MLP_MULT", validator=positive)
    negative_slope: float = param(
        0.0, help="leaky ReLU slope below zero before the square; 0 is relu² (baseline), 0.5 is PR #493's LeakyReLU(0.5)² (#549, #1019, #1392, #1319)",
        validator=in_range(0.0, 1.0),
    )


class Relu2MLP(nn.Module):
    SITES = {"hidden": "(h (B,T,hidden), x (B,T,d)) -> h: the activation, before the square"}

    def __init__(self, dim: int, hidden: int, negative_slope: float = 0.0, sites: SiteBuilder = NO_SITES) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.negative_slope = negative_slope  # a constant in the compiled graph
        self.fc = CastedLinear(dim, hidden, bias=False)
        self.proj = zero_init(CastedLinear(hidden, dim, bias=False))
        self.hidden_site = sites.site("hidden", self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = torch.relu(h) if self.negative_slope == 0.0 else F.leaky_relu(h, negative_slope=self.negative_slope)
        if self.hidden_site is not None:
            h = self.hidden_site(h, x)
        return self.proj(h.square())


def build(params: Relu2Params, ctx) -> Relu2MLP:
    return Relu2MLP(ctx.model.model_dim, int(params.mult * ctx.model.model_dim), params.negative_slope, ctx)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="relu2",
            slot="mlp",
            params=Relu2Params,
            build=build,
            summary="relu-squared MLP with zero-init output projection (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[mlp]\nuse = "relu2"\nmult = 2.0',
        )
    )
