"""LeakyReLU(0.5)² MLP: ``proj(leaky_relu(fc(x), 0.5)²)`` with a zero-initialised output projection.

From openai/parameter-golf PR #493 (ablated at -0.003 val_bpb) and the records built on it, e.g.
``records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon``. Negative pre-activations keep a
gradient, so no hidden unit dies, while the square keeps relu²'s non-negative output. With
``negative_slope = 0`` it is the baseline relu² MLP.
"""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf import CastedLinear, Technique, hookimpl, in_range, param, positive, zero_init


@attrs.define(frozen=True, kw_only=True)
class LeakyRelu2Params:
    mult: float = param(2.0, help="hidden width as a multiple of model_dim", env="MLP_MULT", validator=positive)
    negative_slope: float = param(0.5, help="slope of the leaky ReLU below zero (0 gives relu²)", validator=in_range(0.0, 1.0))


class LeakyRelu2MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, negative_slope: float) -> None:
        super().__init__()
        self.fc = CastedLinear(dim, hidden, bias=False)
        self.proj = zero_init(CastedLinear(hidden, dim, bias=False))
        self.negative_slope = negative_slope  # fixed at build time: a constant in the compiled graph

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=self.negative_slope).square())


def build(params: LeakyRelu2Params, ctx) -> LeakyRelu2MLP:
    dim = ctx.model.model_dim
    return LeakyRelu2MLP(dim, int(params.mult * dim), params.negative_slope)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="leaky_relu2",
            slot="mlp",
            params=LeakyRelu2Params,
            build=build,
            summary="LeakyReLU(0.5)-squared MLP with zero-init output projection (PR #493)",
            source="https://github.com/openai/parameter-golf/pull/493",
            example='[mlp]\nuse = "leaky_relu2"\nmult = 2.0\nnegative_slope = 0.5',
        )
    )
