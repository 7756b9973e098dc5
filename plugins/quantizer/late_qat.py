"""Late QAT: straight-through int-N fake quantization of every CastedLinear, switched on once the LR
multiplier falls below a threshold.

From the #315 line of records (PR #315, #400, #450): at the top of a step, if ``lr_mul < threshold``, turn
on row-wise abs-max fake quantization (``W + stop_grad(W_q - W)``, int6 range [-32, 31]) of all
CastedLinear weights in training mode (log ``late_qat:enabled step:S scale:X``).

The published runs of those PRs compiled the model with ``fullgraph=True`` while the switch was a Python
class attribute; the compiled graph never saw it flip, so their late QAT did nothing (the #315 record's
README says so). Here the fake quantizer sits at each ``CastedLinear``'s ``weight_transform`` site and its
switch is a buffer the compiled graph reads, so ``mode = "working"`` really fake-quantizes after the trigger
under ``torch.compile``. ``mode = "inert"`` reproduces the published runs: the trigger is logged and nothing
is installed, so the step costs nothing more.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.config.fields import in_range, one_of, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class LateQATParams:
    threshold: float = param(0.1, help="switch on when the LR multiplier drops below this", env=("QAT_THRESHOLD", "LATE_QAT_THRESHOLD"))
    bits: int = param(6, help="fake-quant bit width", validator=in_range(2, 8))
    mode: str = param(
        "working",
        help="'working' fake-quantizes after the trigger; 'inert' only logs it (what compiled published runs did)",
        validator=one_of("working", "inert"),
    )
    from_start: bool = param(False, help="fake-quantize from step 0 (the reference's QAT_ENABLED)", env="QAT_ENABLED")


class FakeQuant(nn.Module):
    """Straight-through row-wise abs-max fake quantization of a weight while training and switched on:
    ``w + on * stop_grad(q(w) - w)`` with ``q`` the int-``bits`` rounding; ``on`` is a 0/1 buffer."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.register_buffer("on", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, weight: Tensor, w: Tensor) -> Tensor:
        if not self.training:
            return w
        qmax = self.qmax
        with torch.no_grad():
            w32 = weight.float()
            scale = (w32.abs().amax(dim=1) / qmax).clamp_min(1.0 / qmax)
            w_q = (torch.clamp(torch.round(w32 / scale[:, None]), -qmax - 1, qmax) * scale[:, None]).to(w.dtype)
        return w + self.on.to(w.dtype) * (w_q - w).detach()


class LateQAT:
    def __init__(self, params: LateQATParams) -> None:
        self.params = params
        self.quantizers: list[FakeQuant] = []
        self.enabled = False
        self.enabled_step: int | None = None

    def transform(self, spec, layers, name) -> None:
        """Acts on the built model (every CastedLinear, as the reference's class flag did), not on the spec."""

    def attach(self, model) -> None:
        if self.params.mode == "inert":
            return  # like the compiled reference graph: no fake-quant branch at all, so no extra work per step
        for m in [m for m in model.modules() if isinstance(m, CastedLinear)]:
            m.weight_transform = FakeQuant(self.params.bits).to(m.weight.device)
            self.quantizers.append(m.weight_transform)

    def _switch_on(self) -> None:
        self.enabled = True
        for q in self.quantizers:
            q.on.fill_(1.0)

    def on_train_start(self, state) -> None:
        if self.params.from_start and not self.enabled:
            self._switch_on()
            state.log("qat:enabled from step 0")

    def on_step_start(self, state) -> None:
        if not self.enabled and state.lr_scale < self.params.threshold:
            self._switch_on()
            self.enabled_step = state.step
            note = "" if self.params.mode == "working" else " (inert: no fake quantization, as in the compiled reference runs)"
            state.log(f"late_qat:enabled step:{state.step} scale:{state.lr_scale:.4f}{note}")

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "enabled_step": self.enabled_step}

    def load_state_dict(self, state: dict) -> None:
        if state["enabled"] and not self.enabled:
            self._switch_on()
        self.enabled_step = state["enabled_step"]


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="late_qat",
            slot="modifier",
            params=LateQATParams,
            build=lambda params, ctx: LateQAT(params),
            summary="straight-through int6 fake quantization of all linears once the LR multiplier < threshold",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "late_qat"\nthreshold = 0.1\nmode = "working"',
            enable_env="LATE_QAT",
        )
    )
