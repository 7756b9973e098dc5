"""Per-head attention output gate: ``y_h <- 2 sigmoid(W x[:width])_h * y_h`` before the heads merge.

From the #1667 record (``2026-04-16_SmearGate_AttentionOutputGate_ScoreFirstTTT``, GATE_ATTN_OUT=1): each
head's output is scaled by a gate read from the first ``width`` channels of the attention input. ``W`` starts
at zero, so the gate is 2·sigmoid(0) = 1 and the model starts as it was. A modifier that installs its own
module at the attention's ``heads_out`` site: no pgolf code is edited.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf import CastedLinear, Technique, hookimpl, param, positive, zero_init


@attrs.define(frozen=True, kw_only=True)
class OutputGateParams:
    width: int = param(12, help="input channels the gate reads (the first ones)", unit="channels", env="GATE_WIDTH", validator=positive)


class HeadGate(nn.Module):
    """At ``heads_out``: ``(y (B,T,H,D), v, x (B,T,d), aux) -> y`` with each head scaled by its gate."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.width = width
        self.proj = zero_init(CastedLinear(width, num_heads, bias=False))  # zeroed by the init slot, like the record

    def forward(self, y: Tensor, v: Tensor, x: Tensor, aux=None) -> Tensor:
        gate = 2.0 * torch.sigmoid(self.proj(x[..., : self.width].contiguous()))  # (B, T, H)
        return y * gate[..., None]


class OutputGate:
    def __init__(self, params: OutputGateParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        for i in layers:
            spec.install("attention", i, "heads_out", lambda host: HeadGate(self.params.width, host.num_heads), by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="attention_output_gate",
            slot="modifier",
            params=OutputGateParams,
            build=lambda params, ctx: OutputGate(params),
            summary="per-head attention output gate 2*sigmoid(W x[:width]), zero-init W (record #1667)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-16_SmearGate_AttentionOutputGate_ScoreFirstTTT",
            example='[[modifier]]\nuse = "attention_output_gate"\nlayers = "all"\nwidth = 12',
            enable_env="GATE_ATTN_OUT",
        )
    )
