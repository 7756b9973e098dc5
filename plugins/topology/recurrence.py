"""Depth recurrence: re-run chosen blocks a second time, with shared weights, from a given step on.

As PR #1392 ran it (``RECUR_LAYERS``, ``RECUR_START_STEP``; after PR #1204/#1334): at the top of step
``start_step`` a one-way switch turns recurrence on (log ``depth_recurrence:enabled step:N layers:…``;
a compiled model recompiles once, as the reference did). With it on, a listed encoder layer i runs again
right after its first pass, whose output was already pushed as the U-Net skip:
``x ← x + s_i ⊙ (Block_i(x) − x)`` with a per-layer vector ``s_i`` initialised to ``scale_init``.

The recipe's quirks, each an option set to what ran in ``stacks/pr1392.toml``:

* ``encoder_only = true``: the repeat check sat only in the encoder loop, so of ``RECUR_LAYERS=4,5`` only
  layer 4 (an encoder layer) ever repeated. ``false`` also repeats listed decoder layers (after their
  skip is added).
* ``train_scales = false``: the scales were in no optimizer group and stayed at 0.5 …
* ``zero_scale_grads = false``: … and their ``.grad`` was never zeroed, so it accumulated step after step
  and entered the gradient-norm clip. ``true`` zeroes it every step (a constant blend that does not
  perturb the clip).
* ``always_on_for_eval = true``: the reference built its evaluation model with recurrence on whatever
  the step count reached; pgolf switches it on when training ends.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from pgolf_core.config.fields import non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class RecurrenceParams:
    start_step: int = param(3000, help="training step at whose start recurrence switches on", unit="steps", env="RECUR_START_STEP", validator=non_negative)
    scale_init: float = param(0.5, help="initial value of each repeated layer's blend vector")
    encoder_only: bool = param(True, help="repeat only listed layers of the encoder half (what PR #1392's code did)")
    train_scales: bool = param(False, help="optimize the blend vectors (PR #1392 did not)")
    zero_scale_grads: bool = param(False, help="zero the blend vectors' gradient every step (PR #1392 let it accumulate)")
    always_on_for_eval: bool = param(True, help="switch recurrence on for the final evaluation even if training stopped earlier")


@attrs.define(frozen=True)
class RecurrenceOption:
    layers: tuple[int, ...]
    scale_init: float
    encoder_only: bool
    train_scales: bool


class Recurrence:
    def __init__(self, params: RecurrenceParams) -> None:
        self.params = params
        self.model: nn.Module | None = None
        self.layers: tuple[int, ...] = ()

    def transform(self, spec, layers, name) -> None:
        self.layers = tuple(layers)
        p = self.params
        spec.claim("topology", None, "recurrence", RecurrenceOption(self.layers, p.scale_init, p.encoder_only, p.train_scales), by=name)

    def attach(self, model) -> None:
        self.model = model

    def _switch_on(self, state, reason: str) -> None:
        topo = self.model.topology
        if not topo.recur_active:
            topo.recur_active = True
            state.log(f"depth_recurrence:enabled {reason} layers:{','.join(str(i) for i in self.layers)}")

    def on_step_start(self, state) -> None:
        if self.model is None or not self.layers:
            return
        if state.step == self.params.start_step:
            self._switch_on(state, f"step:{state.step}")
        if self.params.zero_scale_grads:
            for s in self.model.topology.recur_scales:
                s.grad = None

    def on_train_end(self, state) -> None:
        if self.model is not None and self.layers and self.params.always_on_for_eval:
            self._switch_on(state, "for_eval")

    def state_dict(self) -> dict:
        topo = self.model.topology if self.model is not None else None
        grads = [None if s.grad is None else s.grad.detach().clone() for s in topo.recur_scales] if topo is not None else []
        return {"active": bool(topo.recur_active) if topo is not None else False, "scale_grads": grads}

    def load_state_dict(self, state: dict) -> None:
        if self.model is None:
            return
        topo = self.model.topology
        topo.recur_active = bool(state["active"])
        for s, g in zip(topo.recur_scales, state.get("scale_grads", []), strict=False):
            s.grad = None if g is None else g.to(s.device).clone()


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="depth_recurrence",
            slot="modifier",
            params=RecurrenceParams,
            build=lambda params, ctx: Recurrence(params),
            summary="re-run chosen blocks with shared weights from a start step, blended by fixed/learned scales (PR #1392)",
            source="https://github.com/openai/parameter-golf/pull/1392",
            example='[[modifier]]\nuse = "depth_recurrence"\nlayers = [4, 5]\nstart_step = 3000',
            layers_env={"RECUR_LAYERS": lambda v: [int(x) for x in v.split(",") if x.strip()] or None},
        )
    )
