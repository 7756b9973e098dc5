"""SmearGate: blend each position with the previous one through a learned per-channel sigmoid gate.

From the #315 line of records: ``out_t = (1 - g) x_t + g x_{t-1}``, ``g = sigmoid(gate)``, gate zero-init
(g = 0.5), ``x_{-1} = 0``; applied once after the embedding RMSNorm (the embedding's ``x0`` site). The gate
is a control tensor (``smear`` in the references' name list).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import control
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SmearGateParams:
    """No parameters: the gate has model_dim channels."""


class SmearGate(nn.Module):
    mixes_positions = True
    decode_aware = True  # keeps the last position for the next step (pgolf_core.model.decode)
    _decode = None

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = control(nn.Parameter(torch.zeros(dim, dtype=torch.float32)))

    def forward(self, x: Tensor, input_ids: Tensor | None = None) -> Tensor:
        g = torch.sigmoid(self.gate.to(dtype=x.dtype))[None, None, :]
        first = torch.zeros_like(x[:, :1])
        if self._decode is not None:
            st = self._decode.state(self)
            first = st.get("last", first)
            st["last"] = x[:, -1:]
        x_prev = torch.cat([first, x[:, :-1]], dim=1)
        return (1 - g) * x + g * x_prev


class SmearGateModifier:
    def transform(self, spec, layers, name) -> None:
        spec.install("embedding", None, "x0", lambda host: SmearGate(host.dim), by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="smeargate",
            slot="modifier",
            params=SmearGateParams,
            build=lambda params, ctx: SmearGateModifier(),
            summary="learned per-channel blend of each position with the previous one, after the embedding norm",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "smeargate"',
        )
    )
