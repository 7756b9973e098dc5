"""EMA of the weights, updated after every optimizer step and exported instead of the final weights.

From the #315 record (``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``, PR #315): an fp32 copy of the
state dict taken when training starts (after the compile warmup), ``ema = d*ema + (1-d)*w`` after each
step, cast back to each tensor's dtype at export (log ``ema:applying EMA weights``). Periodic validation
still scores the raw weights, as in the reference.
"""

from __future__ import annotations

import attrs
import torch

from pgolf_core.config.fields import in_range, non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class EMAParams:
    decay: float = param(0.997, help="per-step decay", env="EMA_DECAY", toy="horizon", validator=in_range(0.0, 1.0, hi_open=True))
    shadow_swa_every: int = param(
        0,
        help="also sum the weights every N steps once the LR scale is below shadow_swa_start_scale, and never use the sum: "
        "the dead SWA of PRs #1019/#1392/#1319 (costs what it cost them, logs 'swa:start'); 0 = off",
        unit="steps",
        env="SWA_EVERY",
        validator=non_negative,
    )
    shadow_swa_start_scale: float = param(0.2, help="LR scale below which the shadow SWA sums", validator=in_range(0.0, 1.0))


class EMA:
    def __init__(self, params: EMAParams) -> None:
        self.decay = params.decay
        self.params = params
        self.state: dict[str, torch.Tensor] | None = None
        self.shadow_sum: dict[str, torch.Tensor] | None = None
        self.shadow_count = 0
        self.log = print

    def on_train_start(self, state) -> None:
        self.log = state.log
        self.state = {k: t.detach().float().clone() for k, t in state.model.state_dict().items()}

    @torch.no_grad()
    def after_optimizer_step(self, state) -> None:
        d = self.decay
        for name, t in state.model.state_dict().items():
            self.state[name].mul_(d).add_(t.detach().float(), alpha=1.0 - d)
        every = self.params.shadow_swa_every
        if every and state.lr_scale < self.params.shadow_swa_start_scale and state.step % every == 0:
            if self.shadow_sum is None:
                self.shadow_sum = {k: t.detach().cpu().clone() for k, t in state.model.state_dict().items()}
                self.shadow_count = 1
                self.log(f"swa:start step:{state.step}")
            else:
                for k, t in state.model.state_dict().items():
                    self.shadow_sum[k] += t.detach().cpu()
                self.shadow_count += 1

    def export_weights(self, model):
        if self.state is None:
            return model.state_dict()
        self.log("ema:applying EMA weights")
        current = model.state_dict()
        return {k: t.to(dtype=current[k].dtype) for k, t in self.state.items()}

    def state_dict(self) -> dict:
        return {"state": self.state, "shadow_sum": self.shadow_sum, "shadow_count": self.shadow_count}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"]
        self.shadow_sum = state.get("shadow_sum")
        self.shadow_count = state.get("shadow_count", 0)


def _select_env(params: EMAParams) -> dict[str, str]:
    """EMA on (#315, PR #400 read EMA_ENABLED); SWA_ENABLED on only for the shadow SWA: the #1019/#1392/#1319
    scripts sum under it (and always apply EMA), the #315-line ones ignore SWA while EMA is on."""
    return {"EMA_ENABLED": "1", "SWA_ENABLED": "1" if params.shadow_swa_every else "0", "TIGHT_SWA": "0"}


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="ema",
            slot="averaging",
            params=EMAParams,
            build=lambda params, ctx: EMA(params),
            summary="exponential moving average of the weights (fp32), exported instead of the final weights",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[averaging]\nuse = "ema"\ndecay = 0.997',
            select_env=_select_env,
        )
    )
