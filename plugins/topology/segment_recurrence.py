"""Segment recurrence: a contiguous range of layers runs several times in a row, with shared weights, over a
*virtual* layer list that the U-Net skips are laid over; switched on at a fraction of training (PR #1394, after
#1285/#1334's two-layer loops; the two-phase variant is PR #1412's progressive recurrence).

As the records build it (``NUM_LOOPS``, ``LOOP_START``, ``LOOP_END``, ``ENABLE_LOOPING_AT``; #1412 adds
``LOOP_PHASE2_AT``), with ``seg = [loop_start .. loop_end]``::

    virtual = [0 .. loop_start-1] + seg * (num_loops + 1) + [loop_end+1 .. L-1]
    encoder = virtual[:len(virtual)//2],  decoder = virtual[len(virtual)//2:]

e.g. 11 layers, 4-5, ``num_loops = 2``: ``0,1,2,3,4,5,4,5,4,5,6,7,8,9,10`` (15 virtual layers, encoder
``0,1,2,3,4,5,4``, decoder ``5,4,5,6,7,8,9,10``). The U-Net has ``min(len(encoder), len(decoder))`` skip weights
(sized for the full list); each encoder position stores its output as a skip, and decoder position ``j`` takes
skip ``j`` (the last stored one) while ``j`` is below that count, exactly the topology's rule over the virtual
list. Before the switch every layer runs once (``encoder = 0..L/2-1``, the first skip weights only).

The switch: at the start of a step, with ``frac = step / iterations`` (no wallclock cap) or
``elapsed_ms / (1000·(max_wallclock_seconds - clock_reserve_seconds))``, looping turns on when
``frac >= start_frac`` (log ``layer_loop:enabled step:N frac:F encoder:[…] decoder:[…]``). With
``phase2_frac > 0`` (#1412) it turns on first with the segment twice (``min(num_loops, 1) + 1`` passes, log
``layer_loop:phase1``), and with all ``num_loops + 1`` passes at a later step where ``frac >= phase2_frac``
(``layer_loop:phase2``); one transition per step. The final evaluation runs the full list (the records' eval
model is built with ``looping_active = True``). The records' extra warmup steps with looping on (to compile
that graph) change no weights and are not repeated here.

Record #1285 (``RECUR_LAYERS``, ``RECUR_START_STEP``), the two-layer loop this generalises, differs in three ways,
each a switch here: the modifier's ``layers`` selector, when it is not every layer, names the segment (its
``RECUR_LAYERS=4,5``: ``loop_start``/``loop_end`` from it, one extra pass); ``start_step >= 0`` switches on at the
top of that step instead of at a fraction (log ``recurrence:activated step:N layers:[…] virtual_layers:V``); and
``skip_weights = "physical"`` sizes the U-Net skip weights for the physical halves (``min(L//2, L-L//2)``) while
every decoder position takes a stored skip as long as one is left, with weight ``min(j, n-1)``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import attrs
from torch import Tensor, nn

from pgolf_core.config.fields import non_negative, one_of, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SegmentRecurrenceParams:
    loop_start: int = param(4, help="first layer of the repeated segment", unit="layer index", env="LOOP_START", validator=non_negative)
    loop_end: int = param(5, help="last layer of the repeated segment (inclusive)", unit="layer index", env="LOOP_END", validator=non_negative)
    num_loops: int = param(2, help="extra passes over the segment (2: the segment runs 3 times)", unit="passes", env="NUM_LOOPS", validator=non_negative)
    start_frac: float = param(0.5, help="training fraction at which looping switches on", unit="fraction of training", env="ENABLE_LOOPING_AT", validator=non_negative)
    phase2_frac: float = param(0.0, help="PR #1412: > 0 switches on one extra pass at start_frac and all passes at this fraction; 0 = all at once", unit="fraction of training", env="LOOP_PHASE2_AT", validator=non_negative)
    start_step: int = param(-1, help="#1285: >= 0 switches looping on at the top of this step instead of at start_frac; -1 = by fraction", unit="step", env="RECUR_START_STEP")
    skip_weights: str = param("virtual", help="'virtual': one skip weight per encoder/decoder pair of the looped list (#1394); 'physical': sized for the physical halves, decoder position j uses weight min(j, n-1) while skips remain (#1285)", validator=one_of("virtual", "physical"))
    clock_reserve_seconds: float = param(0.0, help="seconds taken off the wallclock cap when the fraction is time-based (the records' GPTQ reserve)", unit="s", env="GPTQ_RESERVE_SECONDS", validator=non_negative)


def virtual_layers(num_layers: int, loop_start: int, loop_end: int, passes: int) -> list[int]:
    """``[0..loop_start-1] + [loop_start..loop_end] * passes + [loop_end+1..num_layers-1]``."""
    seg = list(range(loop_start, loop_end + 1))
    return list(range(loop_start)) + seg * passes + list(range(loop_end + 1, num_layers))


def split(virtual: list[int]) -> tuple[list[int], list[int]]:
    half = len(virtual) // 2
    return virtual[:half], virtual[half:]


class SegmentSchedule(nn.Module):
    """The topology's schedule: plain halves until switched on, then the virtual list of the active phase."""

    def __init__(self, num_layers: int, num_encoder_layers: int, p: SegmentRecurrenceParams, loop: tuple[int, int] | None = None) -> None:
        super().__init__()
        start, end = loop if loop is not None else (p.loop_start, p.loop_end)
        if not start <= end < num_layers:
            raise ValueError(f"segment_recurrence: loop {start}-{end} is not a layer range of a {num_layers}-layer model")
        self.plain = (list(range(num_encoder_layers)), list(range(num_encoder_layers, num_layers)))
        self.phases = {
            1: split(virtual_layers(num_layers, start, end, min(p.num_loops, 1) + 1)),
            2: split(virtual_layers(num_layers, start, end, p.num_loops + 1)),
        }
        self.phase = 0  # a Python int: a compiled graph specialises on it (one recompile per switch)
        enc, dec = self.phases[2]
        self.physical_skips = p.skip_weights == "physical"
        self.num_skips = min(num_encoder_layers, num_layers - num_encoder_layers) if self.physical_skips else min(len(enc), len(dec))

    def skip_index(self, j: int) -> int | None:
        """The skip weight decoder position ``j`` uses when a stored skip is left (None: no skip)."""
        if self.physical_skips:
            return min(j, self.num_skips - 1)
        return j if j < self.num_skips else None

    def _lists(self) -> tuple[list[int], list[int]]:
        return self.phases[self.phase] if self.phase else self.plain

    def encoder(self) -> list[int]:
        return self._lists()[0]

    def decoder(self) -> list[int]:
        return self._lists()[1]

    def run(self, b: int, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = blocks[b](x, x0, aux)
        return out, out


class SegmentRecurrence:
    def __init__(self, params: SegmentRecurrenceParams, iterations: int, max_wallclock_seconds: float, num_layers: int = 0) -> None:
        self.params = params
        self.num_layers = num_layers
        self.loop = (params.loop_start, params.loop_end)
        self.iterations = iterations
        cap = max_wallclock_seconds - params.clock_reserve_seconds
        self.max_ms = 1000.0 * cap if max_wallclock_seconds > 0 else None
        self.schedule: SegmentSchedule | None = None
        self._announced = False

    def transform(self, spec, layers, name) -> None:
        seg = sorted(layers)
        if self.num_layers and seg and seg != list(range(self.num_layers)):
            if seg != list(range(seg[0], seg[-1] + 1)):
                raise ValueError(f"segment_recurrence: layers {seg} are not a contiguous range")
            self.loop = (seg[0], seg[-1])
        p, loop = self.params, self.loop
        spec.replace("topology", None, "schedule", lambda host: SegmentSchedule(host.num_layers, host.num_encoder_layers, p, loop), by=name)

    def attach(self, model) -> None:
        schedule = getattr(model.topology, "schedule", None)
        self.schedule = schedule if isinstance(schedule, SegmentSchedule) else None

    def frac(self, step: int, elapsed_ms: float) -> float:
        if self.max_ms is None:
            return step / max(self.iterations, 1)
        return elapsed_ms / max(self.max_ms, 1e-9)

    def _set(self, phase: int, state, tag: str, detail: str = "") -> None:
        self.schedule.phase = phase
        state.log(f"layer_loop:{tag}{detail} encoder:{self.schedule.encoder()} decoder:{self.schedule.decoder()}")

    def _step_switch(self, state) -> None:
        """#1285: at the top of a step, before its validation, on once ``step >= start_step``."""
        s, p = self.schedule, self.params
        layers = list(range(self.loop[0], self.loop[1] + 1))
        if not self._announced:
            self._announced = True
            state.log(f"recurrence: layers={layers} start_step={p.start_step} active={int(s.phase != 0)}")
        if s.phase == 0 and state.step >= p.start_step:
            s.phase = 2
            state.log(f"recurrence:activated step:{state.step} layers:{layers} virtual_layers:{len(s.encoder()) + len(s.decoder())}")

    def on_eval_start(self, state) -> None:
        if self.schedule is not None and self.params.start_step >= 0:
            self._step_switch(state)

    def on_step_start(self, state) -> None:
        s, p = self.schedule, self.params
        if s is None:
            return
        if p.start_step >= 0:
            self._step_switch(state)
            return
        frac = self.frac(state.step, getattr(state, "elapsed_ms", state.train_time_ms))
        detail = f" step:{state.step} frac:{frac:.3f}"
        if p.phase2_frac > 0:
            if s.phase == 0 and frac >= p.start_frac:
                self._set(1, state, "phase1", detail)
            elif s.phase == 1 and frac >= p.phase2_frac:
                self._set(2, state, "phase2", detail)
        elif s.phase == 0 and frac >= p.start_frac:
            self._set(2, state, "enabled", detail)

    def on_train_end(self, state) -> None:
        if self.schedule is not None and self.schedule.phase != 2:
            self._set(2, state, "enabled", " for_eval")

    @contextlib.contextmanager
    def sequential_view(self) -> Iterator[None]:
        """Every layer once (for a quantizer that asks for a sequential model)."""
        if self.schedule is None:
            yield
            return
        saved = self.schedule.phase
        self.schedule.phase = 0
        try:
            yield
        finally:
            self.schedule.phase = saved

    def state_dict(self) -> dict:
        return {"phase": self.schedule.phase if self.schedule is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None:
            self.schedule.phase = int(state["phase"])


def build(params: SegmentRecurrenceParams, ctx) -> SegmentRecurrence:
    return SegmentRecurrence(params, ctx.run.iterations, ctx.run.max_wallclock_seconds, ctx.model.num_layers)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="segment_recurrence",
            slot="modifier",
            params=SegmentRecurrenceParams,
            build=build,
            summary="loop a layer range N extra times over a virtual layer list with U-Net skips over it, from a training fraction; optional two-phase (progressive) switch (PR #1394, #1412)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2",
            example='[[modifier]]\nuse = "segment_recurrence"\nloop_start = 1\nloop_end = 2\nnum_loops = 2\nstart_frac = 0.5',
            layers_env={"RECUR_LAYERS": lambda v: [int(x) for x in v.split(",") if x.strip()] or None},
        )
    )
