"""Warmdown over the last fraction of training, measured on the training budget, with an LR floor.

From the #1218 record (``lr_mul(training_frac)``; #1060 and later): ``frac`` is the fraction of training done,
``step / iterations`` without a wallclock cap, else ``elapsed_ms / budget_ms`` where the budget is the cap less
every reserve taken off the training clock (GPTQ's ``reserve_seconds``: ``600 - 10 = 590 s`` in #1218). The LR
multiplier is 1 until ``frac`` reaches ``1 - warmdown_frac``, then ``max((1 - frac) / warmdown_frac, min_lr)``: a
linear decay to zero, floored at ``min_lr`` (0 in #1218; 0.1 in #1787).
"""

from __future__ import annotations

import attrs

from pgolf_core.config.fields import in_range, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class WarmdownFractionParams:
    warmdown_frac: float = param(0.667, help="fraction of training (steps, or the wallclock budget) spent in the linear decay; 0 = constant LR", unit="fraction of training", env="WARMDOWN_FRAC", validator=in_range(0.0, 1.0))
    min_lr: float = param(0.0, help="floor of the LR multiplier during the decay", unit="fraction of the base LR", env="MIN_LR", validator=in_range(0.0, 1.0))


class WarmdownFraction:
    def __init__(self, params: WarmdownFractionParams, iterations: int, max_wallclock_seconds: float) -> None:
        self.warmdown_frac, self.min_lr = params.warmdown_frac, params.min_lr
        self.iterations = iterations
        self.budget_ms = 1000.0 * max_wallclock_seconds if max_wallclock_seconds > 0 else None

    def set_train_budget(self, budget_ms: float | None) -> None:
        """The loop's budget: the wallclock cap less the reserved seconds (``pgolf_core.contracts.BudgetAware``)."""
        self.budget_ms = budget_ms

    def frac(self, step: int, elapsed_ms: float) -> float:
        if self.budget_ms is None:
            return step / max(self.iterations, 1)
        return elapsed_ms / max(self.budget_ms, 1e-9)

    def lr_mul(self, step: int, elapsed_ms: float) -> float:
        if self.warmdown_frac <= 0:
            return 1.0
        frac = self.frac(step, elapsed_ms)
        if frac >= 1.0 - self.warmdown_frac:
            return max((1.0 - frac) / self.warmdown_frac, self.min_lr)
        return 1.0


def build(params: WarmdownFractionParams, ctx) -> WarmdownFraction:
    return WarmdownFraction(params, ctx.run.iterations, ctx.run.max_wallclock_seconds)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="warmdown_fraction",
            slot="schedule",
            params=WarmdownFractionParams,
            build=build,
            summary="linear warmdown over the last warmdown_frac of training (steps or the cap less reserves), floored at min_lr (#1218)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-01_Vocab4096_MLPMult4_WD085",
            example='[schedule]\nuse = "warmdown_fraction"\nwarmdown_frac = 0.667\nmin_lr = 0.0',
        )
    )
