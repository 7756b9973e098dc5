"""Canon layers: short causal depthwise convolutions over time inside the block, with a residual and an
optional sigmoid "delta gate" (``h + sigmoid(a) * conv(h)``).

From PR #400 (CANON-AC(last5)+DeltaGate, after PhysicsLM4's Canon layers). Positions, each a host site:
A on the pre-attention norm output (the block's ``attn_in``, after LN scale), B on concat(q, k, v) right
after the projections (the attention's ``qkv``), C on the pre-MLP norm output (the block's ``mlp_in``), D on
relu(fc(x)) before the square (the MLP's ``hidden``). ``conv(h)_t = sum_k w[c,k] h_{t-K+1+k}``
(zero history), an ``nn.Conv1d`` with groups = channels and its default init, which no init slot touches.
Parameter order per layer is the reference's: ``delta_gate_logit`` then the conv.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique

POSITIONS = {"A": ("residual", "attn_in"), "B": ("attention", "qkv"), "C": ("residual", "mlp_in"), "D": ("mlp", "hidden")}


@attrs.define(frozen=True, kw_only=True)
class CanonParams:
    positions: str = param("AC", help="any of A (pre-attention), B (qkv), C (pre-MLP), D (MLP hidden)", env="CANON_SET")
    kernel: int = param(3, help="causal kernel length", unit="tokens", env="CANON_KERNEL", validator=positive, toy="keep")
    residual: bool = param(True, help="add the conv output to its input", env="CANON_RESIDUAL")
    activation: bool = param(False, help="SiLU on the conv output", env="CANON_ACTIVATION")
    bias: bool = param(False, help="conv bias", env="CANON_BIAS")
    delta_gate: bool = param(True, help="scale the conv branch by sigmoid(learned logit)", env="CANON_DELTA_GATE")
    delta_gate_init: float = param(-4.0, help="initial gate logit (sigmoid(-4) ~ 0.018)", env="CANON_DELTA_GATE_INIT")

    def __attrs_post_init__(self) -> None:
        bad = set(self.positions) - set(POSITIONS)
        if bad or not self.positions:
            raise ValueError(f"positions must be letters from ABCD, got {self.positions!r}")


class CanonLayer(nn.Module):
    mixes_positions = True  # a causal conv over time, with no incremental path: generation uses full forwards

    def __init__(self, dim: int, p: CanonParams) -> None:
        super().__init__()
        self.residual = p.residual
        self.activation = p.activation
        self.delta_gate = p.delta_gate
        if p.delta_gate:
            self.delta_gate_logit = nn.Parameter(torch.tensor(float(p.delta_gate_init), dtype=torch.float32))
        else:
            self.register_parameter("delta_gate_logit", None)
        self.conv = nn.Conv1d(dim, dim, kernel_size=p.kernel, groups=dim, bias=p.bias, padding=p.kernel - 1)

    def forward(self, x: Tensor, *context) -> Tensor:
        """``x`` (B, T, C) → same shape; at a site the host's extra arguments are ignored."""
        y = self.conv(x.transpose(1, 2))[..., : x.size(1)].transpose(1, 2)
        if self.activation:
            y = F.silu(y)
        if self.delta_gate:
            gate = torch.sigmoid(self.delta_gate_logit.to(dtype=x.dtype))
            return x + gate * y if self.residual else gate * y
        return x + y if self.residual else y


class CanonQKV(nn.Module):
    """Position B at the attention's ``qkv`` site: one Canon layer over concat(q, k, v), split back."""

    def __init__(self, dim: int, kv_dim: int, p: CanonParams) -> None:
        super().__init__()
        self.widths = (dim, kv_dim, kv_dim)
        self.canon = CanonLayer(dim + 2 * kv_dim, p)

    def forward(self, qkv: tuple[Tensor, Tensor, Tensor], x: Tensor, aux=None) -> tuple[Tensor, Tensor, Tensor]:
        return self.canon(torch.cat(qkv, dim=-1)).split(self.widths, dim=-1)


def _module_for(position: str, host: nn.Module, p: CanonParams) -> nn.Module:
    """The position's module, sized from the host it sits in."""
    if position == "B":
        return CanonQKV(host.dim, host.kv_dim, p)
    if position == "D":
        return CanonLayer(host.hidden, p)
    return CanonLayer(host.dim, p)


class Canon:
    def __init__(self, params: CanonParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        p = self.params
        for i in layers:
            for pos in p.positions:
                slot, site = POSITIONS[pos]
                spec.install(slot, i, site, lambda host, pos=pos: _module_for(pos, host, p), by=name)


def _first_n(v: str):
    return f"first {int(v)}" if int(v) > 0 else None


def _last_n(v: str):
    return f"last {int(v)}" if int(v) > 0 else None


def _one_based(v: str):
    layers = [int(x) - 1 for x in v.split(",") if x.strip()]
    return layers or None


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="canon",
            slot="modifier",
            params=CanonParams,
            build=lambda params, ctx: Canon(params),
            summary="causal depthwise conv (Canon layer) at block positions A/B/C/D with an optional delta gate (PR #400)",
            source="https://github.com/openai/parameter-golf/pull/400",
            example='[[modifier]]\nuse = "canon"\nlayers = "last 5"\npositions = "AC"\nkernel = 3',
            layers_env={"CANON_FIRST_N": _first_n, "CANON_LAST_N": _last_n, "CANON_LAYERS": _one_based},
        )
    )
