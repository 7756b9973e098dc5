"""Pre-norm block with a learned mix of the residual stream and the embedding output x0.

From the official baseline ``train_gpt.py``: ``x = m0*x + m1*x0``; ``x += attn_scale * attn(norm(x))``;
``x += mlp_scale * mlp(norm(x))``, with ``resid_mix`` initialised to (1, 0) and the scales to 1.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import RMSNorm
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ResidMixParams:
    """No parameters: the block's width comes from [model]."""


class ResidMixBlock(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = attn
        self.mlp = mlp
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        attn_out = self.attn(self.attn_norm(x))
        x = x + self.attn_scale.to(dtype=x.dtype)[None, None, :] * attn_out
        x = x + self.mlp_scale.to(dtype=x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x


def build(params: ResidMixParams, ctx, attn: nn.Module, mlp: nn.Module) -> ResidMixBlock:
    return ResidMixBlock(ctx.model.model_dim, attn, mlp)


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
