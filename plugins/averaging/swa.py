"""SWA: average weight snapshots taken every N steps once the LR multiplier drops below a threshold.

Two registrations share this implementation because their references name the knobs differently:

* ``swa`` (PR #450, ``2026-03-22_12L_CatalyticResiduals_BigBigram``): snapshot when ``lr_mul < start_scale``
  and ``step % every == 0``; no cap (env SWA_EVERY, SWA_START_SCALE).
* ``tight_swa`` (PR #400): the same trigger with a cap that keeps the *first* ``max_checkpoints``
  snapshots after the threshold (env TIGHT_SWA_EVERY, TIGHT_SWA_START_LRMUL, TIGHT_SWA_MAX_CHECKPOINTS).

``step`` is the count after the optimizer step and ``lr_mul`` the multiplier computed before it. Both
references accumulate CPU copies in each tensor's own dtype (bf16 tables are summed in bf16);
``accumulate = "float32"`` is the older records' variant. At export, if more than one snapshot was taken,
the sum is divided by the count and cast back (log ``swa:applying averaged N checkpoints``); otherwise the
final weights are exported.
"""

from __future__ import annotations

import attrs
import torch

from pgolf_core.config.fields import non_negative, one_of, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SWAParams:
    every: int = param(50, help="snapshot every N steps", unit="steps", env="SWA_EVERY", validator=positive)
    start_scale: float = param(0.2, help="start once the LR multiplier is below this", env="SWA_START_SCALE")
    max_checkpoints: int = param(0, help="keep at most the first N snapshots; 0 = no cap", validator=non_negative)
    accumulate: str = param("native", help="'native' (each tensor's dtype, on CPU) or 'float32'", validator=one_of("native", "float32"))


@attrs.define(frozen=True, kw_only=True)
class TightSWAParams:
    every: int = param(50, help="snapshot every N steps", unit="steps", env="TIGHT_SWA_EVERY", validator=positive)
    start_scale: float = param(0.2, help="start once the LR multiplier is below this", env="TIGHT_SWA_START_LRMUL")
    max_checkpoints: int = param(12, help="keep at most the first N snapshots; 0 = no cap", env="TIGHT_SWA_MAX_CHECKPOINTS", validator=non_negative)
    accumulate: str = param("native", help="'native' (each tensor's dtype, on CPU) or 'float32'", validator=one_of("native", "float32"))


class SWA:
    def __init__(self, params) -> None:
        self.params = params
        self.sum: dict[str, torch.Tensor] | None = None
        self.count = 0
        self.log = print

    def on_train_start(self, state) -> None:
        self.log = state.log

    def _snapshot(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.float().clone() if self.params.accumulate == "float32" else t.cpu().clone()

    @torch.no_grad()
    def after_optimizer_step(self, state) -> None:
        p = self.params
        if not (state.lr_scale < p.start_scale and state.step % p.every == 0):
            return
        if p.max_checkpoints > 0 and self.count >= p.max_checkpoints:
            return
        weights = state.model.state_dict()
        if self.sum is None:
            self.sum = {k: self._snapshot(t) for k, t in weights.items()}
            self.count = 1
            self.log(f"swa:start step:{state.step}")
        else:
            for k, t in weights.items():
                self.sum[k].add_(t.detach().to(device=self.sum[k].device, dtype=self.sum[k].dtype))
            self.count += 1

    def export_weights(self, model):
        if self.sum is None or self.count <= 1:
            return model.state_dict()
        self.log(f"swa:applying averaged {self.count} checkpoints")
        current = model.state_dict()
        return {k: (t / self.count).to(device=current[k].device, dtype=current[k].dtype) for k, t in self.sum.items()}

    def state_dict(self) -> dict:
        return {"sum": self.sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sum, self.count = state["sum"], state["count"]


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="swa",
            slot="averaging",
            params=SWAParams,
            build=lambda params, ctx: SWA(params),
            summary="average snapshots every N steps once the LR multiplier is below start_scale (PR #450)",
            source="https://github.com/openai/parameter-golf/pull/450",
            example='[averaging]\nuse = "swa"\nevery = 50\nstart_scale = 0.2',
            select_env={"EMA_ENABLED": "0", "SWA_ENABLED": "1", "TIGHT_SWA": "0"},
        )
    )
    register(
        Technique(
            name="tight_swa",
            slot="averaging",
            params=TightSWAParams,
            build=lambda params, ctx: SWA(params),
            summary="SWA with a cap keeping the first N snapshots after the threshold (PR #400 'tight SWA')",
            source="https://github.com/openai/parameter-golf/pull/400",
            example='[averaging]\nuse = "tight_swa"\nevery = 50\nstart_scale = 0.2\nmax_checkpoints = 12',
            # PR #400's command: EMA_ENABLED=0 SWA_ENABLED=1 TIGHT_SWA=1 (its script defaults to TIGHT_SWA=0).
            select_env={"EMA_ENABLED": "0", "SWA_ENABLED": "1", "TIGHT_SWA": "1"},
        )
    )
