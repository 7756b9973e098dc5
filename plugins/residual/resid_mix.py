"""Pre-norm block with a learned mix of the residual stream and the embedding output x0.

From the official baseline ``train_gpt.py``: ``x = m0*x + m1*x0``; ``x += attn_scale * attn(norm(x))``;
``x += mlp_scale * mlp(norm(x))``, with ``resid_mix`` initialised to (1, 0) and the scales to 1.

Options modifiers may set: ``ln_scale`` (a float multiplying both norm outputs, from ``ln_scale``);
``catalytic`` (extra per-channel gates on both branches, from ``catalytic_residuals``); ``canon_a`` /
``canon_c`` (factories of modules applied to the attention / MLP inputs, from ``canon``); ``parallel``
(attention and MLP both read the mixed input, from ``parallel_residual``).
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
    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, ln_scale: float = 1.0, catalytic: bool = False, canon_a=None, canon_c=None,
        parallel: bool = False,
    ) -> None:
        super().__init__()
        self.parallel = parallel  # a Python flag: the compiled graph specialises on it
        self.ln_scale_factor = ln_scale
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = attn
        self.mlp = mlp
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.catalytic = catalytic
        if catalytic:
            self.attn_gate = nn.Parameter(torch.ones(dim, dtype=torch.float32))
            self.mlp_gate = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.canon_a = canon_a() if canon_a is not None else None
        self.canon_c = canon_c() if canon_c is not None else None

    def forward(self, x: Tensor, x0: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        s = self.ln_scale_factor
        attn_in = self.attn_norm(x) * s if s != 1.0 else self.attn_norm(x)
        if self.canon_a is not None:
            attn_in = self.canon_a(attn_in)
        attn_out = self.attn(attn_in, aux) if aux else self.attn(attn_in)
        attn_gain = self.attn_scale.to(dtype=x.dtype)[None, None, :]
        if self.catalytic:
            attn_gain = attn_gain * self.attn_gate.to(dtype=x.dtype)[None, None, :]
        if self.parallel:  # both branches read the mixed input (PR #1392's parallel blocks)
            mlp_in = self.mlp_norm(x) * s if s != 1.0 else self.mlp_norm(x)
            if self.canon_c is not None:
                mlp_in = self.canon_c(mlp_in)
            mlp_gain = self.mlp_scale.to(dtype=x.dtype)[None, None, :]
            if self.catalytic:
                mlp_gain = mlp_gain * self.mlp_gate.to(dtype=x.dtype)[None, None, :]
            return x + attn_gain * attn_out + mlp_gain * self.mlp(mlp_in)
        x = x + attn_gain * attn_out
        mlp_in = self.mlp_norm(x) * s if s != 1.0 else self.mlp_norm(x)
        if self.canon_c is not None:
            mlp_in = self.canon_c(mlp_in)
        mlp_gain = self.mlp_scale.to(dtype=x.dtype)[None, None, :]
        if self.catalytic:
            mlp_gain = mlp_gain * self.mlp_gate.to(dtype=x.dtype)[None, None, :]
        x = x + mlp_gain * self.mlp(mlp_in)
        return x


def build(params: ResidMixParams, ctx, attn: nn.Module, mlp: nn.Module) -> ResidMixBlock:
    return ResidMixBlock(
        ctx.model.model_dim,
        attn,
        mlp,
        ln_scale=ctx.option("ln_scale", 1.0),
        catalytic=bool(ctx.option("catalytic", False)),
        canon_a=ctx.option("canon_a"),
        canon_c=ctx.option("canon_c"),
        parallel=bool(ctx.option("parallel", False)),
    )


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
