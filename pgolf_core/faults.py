"""Deliberate faults for testing recovery: ``PGOLF_FAULT`` makes a run die or diverge at a chosen step.

``PGOLF_FAULT`` holds comma-separated faults, each ``KIND:step=N[:rank=R][:code=C]``:

* ``exit:step=N`` — the process ends with ``os._exit(C)`` (default 17) right after step N, as a crashed or
  killed worker would (no cleanup, no checkpoint of step N). Only on the first attempt of a torchelastic
  job (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so ``torchrun --max-restarts`` recovers from it.
* ``nan:step=N`` — step N's training loss becomes NaN (the model's output is multiplied by NaN during that
  step's forward passes; the weights are not touched), as a diverging run would.

``rank=R`` limits a fault to one rank (default: every rank). Unset, nothing is attached and no code runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import attrs

from .errors import ConfigError
from .hookspecs import hookimpl

ENV = "PGOLF_FAULT"
KINDS = ("exit", "nan")


@attrs.define(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    code: int = 17


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, *fields = item.split(":")
        values: dict[str, int] = {}
        try:
            for f in fields:
                key, _, value = f.partition("=")
                if key not in ("step", "rank", "code"):
                    raise ValueError(key)
                values[key] = int(value)
        except ValueError:
            raise ConfigError(f"{ENV}={spec!r}: bad field in {item!r}; write KIND:step=N[:rank=R][:code=C]") from None
        if kind not in KINDS or "step" not in values:
            raise ConfigError(f"{ENV}={spec!r}: {item!r} needs a kind ({', '.join(KINDS)}) and step=N")
        faults.append(Fault(kind, values["step"], values.get("rank"), values.get("code", 17)))
    return faults


class FaultInjector:
    """A loop observer (the ``pgolf_on_*`` hooks) that carries out the faults meant for this rank."""

    def __init__(self, faults: list[Fault], rank: int) -> None:
        mine = [f for f in faults if f.rank is None or f.rank == rank]
        from .procenv import attempt_or_zero

        first_attempt = attempt_or_zero() == 0
        self.exits = {f.step: f.code for f in mine if f.kind == "exit" and first_attempt}
        self.nan_steps = {f.step for f in mine if f.kind == "nan"}
        self.poison = False
        self._handle: Any = None

    def _forward_hook(self, module: Any, args: Any, output: Any) -> Any:
        return output * float("nan") if self.poison else output

    @hookimpl
    def pgolf_on_train_start(self, state: Any) -> None:
        if self.nan_steps and self._handle is None:
            self._handle = state.model.register_forward_hook(self._forward_hook)

    @hookimpl
    def pgolf_on_step_start(self, state: Any) -> None:
        self.poison = state.step + 1 in self.nan_steps

    @hookimpl
    def pgolf_after_optimizer_step(self, state: Any) -> None:
        self.poison = False

    @hookimpl
    def pgolf_on_eval_start(self, state: Any) -> None:
        self.poison = False

    @hookimpl
    def pgolf_on_step_end(self, state: Any) -> None:
        code = self.exits.get(state.step)
        if code is not None:
            print(f"{ENV}: exiting with code {code} after step {state.step}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(code)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def attach(registry: Any, runtime: Any) -> Callable[[], None]:
    """Register the faults of ``PGOLF_FAULT`` for this run; returns the function that removes them."""
    spec = os.environ.get(ENV, "")
    faults = parse(spec) if spec.strip() else []
    if not faults:
        return lambda: None
    injector = FaultInjector(faults, runtime.rank)
    registry.pm.register(injector, name="pgolf:faults")

    def detach() -> None:
        injector.remove()
        if registry.pm.is_registered(injector):
            registry.pm.unregister(injector)

    return detach
