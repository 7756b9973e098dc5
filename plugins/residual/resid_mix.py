"""Pre-norm block with a learned mix of the residual stream and the embedding output x0.

From the official baseline ``train_gpt.py``: ``x = m0*x + m1*x0``; ``x += attn_scale * attn(norm(x))``;
``x += mlp_scale * mlp(norm(x))``, with ``resid_mix`` initialised to (1, 0) and the scales to 1.

Options modifiers may set: ``ln_scale`` (a float multiplying both norm outputs, from ``ln_scale``);
``catalytic`` (extra per-channel gates on both branches, from ``catalytic_residuals``); ``canon_a`` /
``canon_c`` (factories of modules applied to the attention / MLP inputs, from ``canon``); ``parallel``:
``True`` (attention and MLP both read the mixed input, from ``parallel_residual``) or ``("two_lane",
route_init)`` (``forward_lanes`` with an attention and an MLP lane, from ``two_lane_parallel``).
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
        parallel: bool = False, two_lane_routes: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel  # a Python flag: the compiled graph specialises on it
        self.two_lane = two_lane_routes is not None
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
        if self.two_lane:  # PR #1289 created these right after resid_mix
            self.resid_mix_mlp = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
            self.route = nn.Parameter(torch.tensor([float(r) for r in two_lane_routes], dtype=torch.float32))
        self.canon_a = canon_a() if canon_a is not None else None
        self.canon_c = canon_c() if canon_c is not None else None

    def _attn_delta(self, u: Tensor, aux: dict[str, Tensor] | None) -> Tensor:
        """``attn_scale (⊙ attn_gate) ⊙ Attn(norm(u)·s)``: the attention branch's addition to the stream."""
        s = self.ln_scale_factor
        attn_in = self.attn_norm(u) * s if s != 1.0 else self.attn_norm(u)
        if self.canon_a is not None:
            attn_in = self.canon_a(attn_in)
        attn_out = self.attn(attn_in, aux) if aux else self.attn(attn_in)
        gain = self.attn_scale.to(dtype=u.dtype)[None, None, :]
        if self.catalytic:
            gain = gain * self.attn_gate.to(dtype=u.dtype)[None, None, :]
        return gain * attn_out

    def _mlp_delta(self, u: Tensor) -> Tensor:
        """``mlp_scale (⊙ mlp_gate) ⊙ MLP(norm(u)·s)``: the MLP branch's addition to the stream."""
        s = self.ln_scale_factor
        mlp_in = self.mlp_norm(u) * s if s != 1.0 else self.mlp_norm(u)
        if self.canon_c is not None:
            mlp_in = self.canon_c(mlp_in)
        gain = self.mlp_scale.to(dtype=u.dtype)[None, None, :]
        if self.catalytic:
            gain = gain * self.mlp_gate.to(dtype=u.dtype)[None, None, :]
        return gain * self.mlp(mlp_in)

    @staticmethod
    def _mix(weights: Tensor, x: Tensor, x0: Tensor) -> Tensor:
        w = weights.to(dtype=x.dtype)
        return w[0][None, None, :] * x + w[1][None, None, :] * x0

    def forward(self, x: Tensor, x0: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        x = self._mix(self.resid_mix, x, x0)
        if self.parallel:  # both branches read the mixed input (PR #1392's parallel blocks)
            return x + self._attn_delta(x, aux) + self._mlp_delta(x)
        x = x + self._attn_delta(x, aux)
        return x + self._mlp_delta(x)

    def forward_lanes(self, x_a: Tensor, x_m: Tensor, x0: Tensor, aux: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """PR #1289's two-lane block: attention reads the attention lane, the MLP the MLP lane; ``route`` writes both."""
        r = self.route.to(dtype=x_a.dtype)
        attn_delta = self._attn_delta(self._mix(self.resid_mix, x_a, x0), aux)
        mlp_delta = self._mlp_delta(self._mix(self.resid_mix_mlp, x_m, x0))
        return x_a + r[0] * attn_delta + r[2] * mlp_delta, x_m + r[1] * attn_delta + r[3] * mlp_delta


def build(params: ResidMixParams, ctx, attn: nn.Module, mlp: nn.Module) -> ResidMixBlock:
    parallel = ctx.option("parallel", False)
    two_lane = parallel[1] if isinstance(parallel, tuple) and parallel[0] == "two_lane" else None
    return ResidMixBlock(
        ctx.model.model_dim,
        attn,
        mlp,
        ln_scale=ctx.option("ln_scale", 1.0),
        catalytic=bool(ctx.option("catalytic", False)),
        canon_a=ctx.option("canon_a"),
        canon_c=ctx.option("canon_c"),
        parallel=parallel is True,
        two_lane_routes=two_lane,
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
