"""Constant LR, then a linear warmdown to zero — by iterations, or by wallclock when a cap is set.

From the official baseline ``train_gpt.py`` (``lr_mul``). Without a wallclock cap the last
``warmdown_iters`` steps decay linearly. With a cap, the warmdown length is estimated in milliseconds as
``warmdown_iters * (elapsed_ms / step)`` and the multiplier is ``remaining_ms / warmdown_ms`` once the
remaining time falls below it.
"""

from __future__ import annotations

import math

import attrs

from pgolf_core.config.fields import non_negative, one_of, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class LinearWarmdownParams:
    warmdown_iters: int = param(1200, help="length of the final linear decay", unit="steps", env="WARMDOWN_ITERS", validator=non_negative)
    shape: str = param(
        "linear",
        help="'linear': scale = frac; 'sqrt': scale = 1 - sqrt(1 - frac), below linear everywhere (PR #1319)",
        env="WARMDOWN_SHAPE",
        validator=one_of("linear", "sqrt"),
    )


class LinearWarmdown:
    def __init__(self, params: LinearWarmdownParams, iterations: int, max_wallclock_seconds: float) -> None:
        self.warmdown_iters = params.warmdown_iters
        self.sqrt_shape = params.shape == "sqrt"
        self.iterations = iterations
        self.max_wallclock_ms = 1000.0 * max_wallclock_seconds if max_wallclock_seconds > 0 else None

    def lr_mul(self, step: int, elapsed_ms: float) -> float:
        frac = self._frac(step, elapsed_ms)
        if self.sqrt_shape and frac < 1.0:
            return 1.0 - math.sqrt(1.0 - frac)
        return frac

    def _frac(self, step: int, elapsed_ms: float) -> float:
        if self.warmdown_iters <= 0:
            return 1.0
        if self.max_wallclock_ms is None:
            start = max(self.iterations - self.warmdown_iters, 0)
            if start <= step < self.iterations:
                return max((self.iterations - step) / max(self.warmdown_iters, 1), 0.0)
            return 1.0
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = self.warmdown_iters * step_ms
        remaining_ms = max(self.max_wallclock_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def build(params: LinearWarmdownParams, ctx) -> LinearWarmdown:
    return LinearWarmdown(params, ctx.run.iterations, ctx.run.max_wallclock_seconds)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="linear_warmdown",
            slot="schedule",
            params=LinearWarmdownParams,
            build=build,
            summary="constant LR then linear warmdown, by steps or by the wallclock cap (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[schedule]\nuse = "linear_warmdown"\nwarmdown_iters = 1200',
        )
    )
