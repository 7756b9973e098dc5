"""Depth recurrence: re-run chosen blocks a second time, with shared weights, from a given step on.

As PR #1392 ran it (``RECUR_LAYERS``, ``RECUR_START_STEP``; after PR #1204/#1334): at the top of step
``start_step`` a one-way switch turns recurrence on (log ``depth_recurrence:enabled step:N layers:…``;
a compiled model recompiles once, as the reference did). With it on, a listed encoder layer i runs again
right after its first pass, whose output was already stored as the U-Net skip:
``x ← x + s_i ⊙ (Block_i(x) − x)`` with a per-layer vector ``s_i`` initialised to ``scale_init``. It
replaces the topology's ``schedule`` part (created before the skip weights, as the reference created the
scales first).

The recipe's quirks, each an option set to what ran in ``stacks/pr1392.toml``:

* ``encoder_only = true``: the repeat check sat only in the encoder loop, so of ``RECUR_LAYERS=4,5`` only
  layer 4 (an encoder layer) ever repeated. ``false`` also repeats listed decoder layers (after their
  skip is added).
* ``train_scales = false``: the scales were in no optimizer group (frozen) and stayed at 0.5 …
* ``zero_scale_grads = false``: … and their ``.grad`` was never zeroed, so it accumulated step after step
  and entered the gradient-norm clip. ``true`` zeroes it every step (a constant blend that does not
  perturb the clip).
* ``always_on_for_eval = true``: the reference built its evaluation model with recurrence on whatever
  the step count reached; pgolf switches it on when training ends.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.config.fields import non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import frozen
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class RecurrenceParams:
    start_step: int = param(3000, help="training step at whose start recurrence switches on", unit="steps", env="RECUR_START_STEP", validator=non_negative)
    scale_init: float = param(0.5, help="initial value of each repeated layer's blend vector")
    encoder_only: bool = param(True, help="repeat only listed layers of the encoder half (what PR #1392's code did)")
    train_scales: bool = param(False, help="optimize the blend vectors (PR #1392 did not)")
    zero_scale_grads: bool = param(False, help="zero the blend vectors' gradient every step (PR #1392 let it accumulate)")
    always_on_for_eval: bool = param(True, help="switch recurrence on for the final evaluation even if training stopped earlier")


class RecurrenceSchedule(nn.Module):
    """The topology's schedule: every block once; when ``active``, the listed blocks a second time, blended."""

    def __init__(self, num_layers: int, num_encoder_layers: int, dim: int, layers: tuple[int, ...], p: RecurrenceParams) -> None:
        super().__init__()
        self.num_layers, self.num_encoder_layers = num_layers, num_encoder_layers
        self.layers = layers
        self.encoder_only = p.encoder_only
        self.active = False  # a Python flag: the compiled graph specialises on it (one recompile when it flips)
        self.scales = nn.ParameterList([nn.Parameter(torch.full((dim,), float(p.scale_init), dtype=torch.float32)) for _ in layers])
        if not p.train_scales:
            for s in self.scales:
                frozen(s)
        self.num_skips = min(num_encoder_layers, num_layers - num_encoder_layers)
        self.repeats = frozenset(i for i in layers if i < num_encoder_layers or not p.encoder_only)

    def encoder(self) -> list[int]:
        return list(range(self.num_encoder_layers))

    def decoder(self) -> list[int]:
        return list(range(self.num_encoder_layers, self.num_layers))

    def run(self, b: int, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = blocks[b](x, x0, aux)
        if self.active and b in self.repeats:
            scale = self.scales[self.layers.index(b)]
            again = blocks[b](out, x0, aux)
            return out + scale.to(dtype=out.dtype)[None, None, :] * (again - out), out
        return out, out


class Recurrence:
    def __init__(self, params: RecurrenceParams) -> None:
        self.params = params
        self.schedule: RecurrenceSchedule | None = None
        self.layers: tuple[int, ...] = ()

    def transform(self, spec, layers, name) -> None:
        self.layers = tuple(layers)
        p = self.params
        spec.replace("topology", None, "schedule", lambda host: RecurrenceSchedule(host.num_layers, host.num_encoder_layers, host.dim, self.layers, p), by=name)

    def attach(self, model) -> None:
        schedule = getattr(model.topology, "schedule", None)
        self.schedule = schedule if isinstance(schedule, RecurrenceSchedule) else None

    def _switch_on(self, state, reason: str) -> None:
        if not self.schedule.active:
            self.schedule.active = True
            state.log(f"depth_recurrence:enabled {reason} layers:{','.join(str(i) for i in self.layers)}")

    def on_step_start(self, state) -> None:
        if self.schedule is None or not self.layers:
            return
        if state.step == self.params.start_step:
            self._switch_on(state, f"step:{state.step}")
        if self.params.zero_scale_grads:
            for s in self.schedule.scales:
                s.grad = None

    def on_train_end(self, state) -> None:
        if self.schedule is not None and self.layers and self.params.always_on_for_eval:
            self._switch_on(state, "for_eval")

    @contextlib.contextmanager
    def sequential_view(self) -> Iterator[None]:
        """Every block once (PR #1392's Hessian model had recurrence off)."""
        if self.schedule is None:
            yield
            return
        saved = self.schedule.active
        self.schedule.active = False
        try:
            yield
        finally:
            self.schedule.active = saved

    def state_dict(self) -> dict:
        sched = self.schedule
        grads = [None if s.grad is None else s.grad.detach().clone() for s in sched.scales] if sched is not None else []
        return {"active": bool(sched.active) if sched is not None else False, "scale_grads": grads}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is None:
            return
        self.schedule.active = bool(state["active"])
        for s, g in zip(self.schedule.scales, state.get("scale_grads", []), strict=False):
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
