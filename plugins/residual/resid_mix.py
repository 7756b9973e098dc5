"""Pre-norm block with a learned mix of the residual stream and the embedding output x0.

From the official baseline ``train_gpt.py``: ``x = m0*x + m1*x0``; ``x += attn_scale * attn(norm(x))``;
``x += mlp_scale * mlp(norm(x))``, with ``resid_mix`` initialised to (1, 0) and the scales to 1. The pieces
are methods (``mix``, ``attn_delta``, ``mlp_delta``) so that a technique that wires them differently
(parallel blocks, two lanes) reuses them unchanged.

Sites: ``attn_in`` / ``mlp_in`` on each branch's normed input (LN scale, Canon A/C) and ``attn_gain`` /
``mlp_gain`` on each branch's per-channel gain (catalytic gates). Part ``wiring``: how the branches compose
(default: ``sequential``, as above). Parameter creation order, as the records extended it: the scales, the
gain sites' modules, ``resid_mix``, the wiring's own parameters, then the input sites' modules.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import RMSNorm
from pgolf_core.model.roles import control
from pgolf_core.model.sites import NO_SITES, SiteBuilder
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ResidMixParams:
    """No parameters: the block's width comes from [model]."""


class ResidMixBlock(nn.Module):
    SITES = {
        "attn_in": "(h (B,T,d)) -> h: the normed input of the attention branch",
        "mlp_in": "(h (B,T,d)) -> h: the normed input of the MLP branch",
        "attn_gain": "(gain (1,1,d)) -> gain: the attention branch's per-channel gain",
        "mlp_gain": "(gain (1,1,d)) -> gain: the MLP branch's per-channel gain",
    }
    PARTS = {"wiring": "nn.Module: (block, x, x0, aux) -> x, composing block.mix, block.attn_delta, block.mlp_delta (default: sequential)"}

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, sites: SiteBuilder = NO_SITES, layer: int = 0) -> None:
        super().__init__()
        self.dim, self.layer = dim, layer
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = attn
        self.mlp = mlp
        self.attn_scale = control(nn.Parameter(torch.ones(dim, dtype=torch.float32)))
        self.mlp_scale = control(nn.Parameter(torch.ones(dim, dtype=torch.float32)))
        self.attn_gain = sites.site("attn_gain", self)
        self.mlp_gain = sites.site("mlp_gain", self)
        self.resid_mix = control(nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float()))
        self.wiring = sites.part("wiring", self)
        self.attn_in = sites.site("attn_in", self)
        self.mlp_in = sites.site("mlp_in", self)

    @staticmethod
    def mix_with(weights: Tensor, x: Tensor, x0: Tensor) -> Tensor:
        w = weights.to(dtype=x.dtype)
        return w[0][None, None, :] * x + w[1][None, None, :] * x0

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        """``resid_mix[0] ⊙ x + resid_mix[1] ⊙ x0``: what the block reads."""
        return self.mix_with(self.resid_mix, x, x0)

    def attn_delta(self, u: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        """``attn_scale ⊙ Attn(norm(u))``: the attention branch's addition to the stream."""
        h = self.attn_norm(u)
        if self.attn_in is not None:
            h = self.attn_in(h)
        out = self.attn(h, aux) if aux else self.attn(h)
        gain = self.attn_scale.to(dtype=u.dtype)[None, None, :]
        if self.attn_gain is not None:
            gain = self.attn_gain(gain)
        return gain * out

    def mlp_delta(self, u: Tensor) -> Tensor:
        """``mlp_scale ⊙ MLP(norm(u))``: the MLP branch's addition to the stream."""
        h = self.mlp_norm(u)
        if self.mlp_in is not None:
            h = self.mlp_in(h)
        gain = self.mlp_scale.to(dtype=u.dtype)[None, None, :]
        if self.mlp_gain is not None:
            gain = self.mlp_gain(gain)
        return gain * self.mlp(h)

    def sequential(self, x: Tensor, x0: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        """The baseline's composition: attention, then the MLP on the updated stream."""
        x = self.mix(x, x0)
        x = x + self.attn_delta(x, aux)
        return x + self.mlp_delta(x)

    def forward(self, x: Tensor, x0: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        if self.wiring is not None:
            return self.wiring(self, x, x0, aux)
        return self.sequential(x, x0, aux)


def build(params: ResidMixParams, ctx, attn: nn.Module, mlp: nn.Module) -> ResidMixBlock:
    return ResidMixBlock(ctx.model.model_dim, attn, mlp, ctx, ctx.layer or 0)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="resid_mix",
            slot="residual",
            params=ResidMixParams,
            build=build,
            summary="pre-norm block with learned x/x0 residual mix and per-channel branch scales (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[residual]\nuse = "resid_mix"',
        )
    )
