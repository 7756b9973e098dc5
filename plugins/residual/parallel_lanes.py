"""Split residual lanes: from one decoder block on, an attention lane and an MLP lane, merged by ``lane_merge``.

Records #1334 (``2026-04-04_SP4096_DepthRecurrence_ParallelResid_MuonEqR``, 1.0897) and #1477
(``2026-04-08_SP8192_ParallelResid_ScoreFirstTTT``, 1.0822), ``PARALLEL_START_LAYER=7`` (T8). Their
``forward_logits``: the encoder and the decoder run as usual until the first decoder block ``i >= start``; there
the stream ``x`` (its U-Net skip already added) is copied into two lanes, and that block and every later one do

* attention lane: ``u = resid_mix[0]⊙lane0 + resid_mix[1]⊙x0``; ``lane0 ← u + attn_scale⊙Attn(norm(u)·s)``
  (the residual base is the mix ``u``, as in a sequential block);
* MLP lane: ``lane1 ← lane1 + mlp_scale⊙MLP(norm(lane1)·s)`` (the raw lane: no ``resid_mix``, no x0);

with no cross routes: attention output never enters the MLP lane, nor MLP output the attention lane. After the
last block ``x = m·lane0 + (1 − m)·lane1`` with one scalar ``lane_merge`` initialised to 0.5, a control tensor
(the records' ``CONTROL_TENSOR_NAME_PATTERNS`` list it; scalar Adam). U-Net skips of later decoder positions go
to the attention lane (#1477, ``torch.lerp`` under skip gates: the topology's ``add_skip``); #1334 added them to
the stale pre-split ``x``, which nothing reads again, so its later skips were dropped (``skips_after_split =
"dropped"`` reproduces that).

What the existing wirings lack: ``parallel_residual`` (#1392) has one stream; ``two_lane_parallel`` (#1289)
routes both branches into both lanes with a learned ``route`` and gives the MLP its own ``resid_mix_mlp`` on raw
lanes. Here routes are frozen at ``route_init`` = (attn→attn, attn→mlp, mlp→attn, mlp→mlp) = (1, 0, 0, 1), the
records' "no cross routes"; ``learn_routes = true`` makes them a per-block (4,) control parameter initialised
to ``route_init`` (``topology.decoder.routes``), with ``lane0 ← u + r0 Δa + r2 Δm`` and
``lane1 ← lane1 + r1 Δa + r3 Δm``. Frozen routes of 0 and 1 add no operation.

The part is the topology's ``decoder``; blocks keep their own wiring for the encoder. The records start the
lanes at the first decoder block with index ``>= start`` and keep them to the end, so ``layers`` must be a
suffix ``"k:"``; a layer the topology's schedule repeats is refused (its repeats would bypass the schedule).
``PARALLEL_START_LAYER=N`` selects ``N:``; 0 or less selects none (the records' "off").
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.config.fields import one_of, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import control
from pgolf_core.registry import Technique


def _four_routes(instance, attribute, value) -> None:
    if len(value) != 4:
        raise ValueError(f"{attribute.name} must have 4 values (attn→attn, attn→mlp, mlp→attn, mlp→mlp), got {len(value)}")


@attrs.define(frozen=True, kw_only=True)
class ParallelLanesParams:
    merge_init: float = param(0.5, help="initial lane_merge weight m of the attention lane (x = m·lane0 + (1-m)·lane1)")
    route_init: tuple[float, ...] = param(
        (1.0, 0.0, 0.0, 1.0), help="routes (attn→attn lane, attn→mlp lane, mlp→attn lane, mlp→mlp lane); (1, 0, 0, 1): no cross routes",
        validator=_four_routes,
    )
    learn_routes: bool = param(False, help="learn the routes (a (4,) control parameter per lane block) instead of freezing them")
    skips_after_split: str = param(
        "attention_lane", help="U-Net skips of decoder positions after the split: added to the attention lane (#1477) or dropped (#1334's code)",
        validator=one_of("attention_lane", "dropped"),
    )


class LaneDecoder(nn.Module):
    """The topology's decoder: sequential blocks until the first of ``layers``, two lanes from there, merged at the end."""

    def __init__(self, layers: tuple[int, ...], params: ParallelLanesParams) -> None:
        super().__init__()
        self.layers = layers
        self.skips_to_lane = params.skips_after_split == "attention_lane"
        self.lane_merge = control(nn.Parameter(torch.tensor(float(params.merge_init), dtype=torch.float32)))
        self.route_init = tuple(float(r) for r in params.route_init)
        self.slot = {b: k for k, b in enumerate(layers)}
        if params.learn_routes:
            self.routes = control(nn.Parameter(torch.tensor([self.route_init] * len(layers), dtype=torch.float32)))
        else:
            self.routes = None

    def lanes(self, block: nn.Module, b: int, lane0: Tensor, lane1: Tensor, x0: Tensor, aux) -> tuple[Tensor, Tensor]:
        u = block.mix(lane0, x0)
        attn_delta = block.attn_delta(u, aux)
        mlp_delta = block.mlp_delta(lane1)
        if self.routes is not None:
            r = self.routes[self.slot[b]].to(dtype=u.dtype)
            return u + r[0] * attn_delta + r[2] * mlp_delta, lane1 + r[1] * attn_delta + r[3] * mlp_delta
        return _route(u, attn_delta, mlp_delta, self.route_init[0], self.route_init[2]), _route(lane1, attn_delta, mlp_delta, self.route_init[1], self.route_init[3])

    def forward(self, topo: nn.Module, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux, skips: list[Tensor]) -> Tensor:
        lane0 = lane1 = None
        for j, b in enumerate(topo.decoder_blocks()):
            if lane0 is None:
                if skips and j < topo.num_skips:
                    x = topo.add_skip(x, j, skips.pop())
                if b in self.slot:
                    lane0, lane1 = self.lanes(blocks[b], b, x, x, x0, aux)
                else:
                    x = topo.run(b, x, x0, blocks, aux)
                continue
            if skips and j < topo.num_skips:
                skip = skips.pop()
                if self.skips_to_lane:
                    lane0 = topo.add_skip(lane0, j, skip)
            lane0, lane1 = self.lanes(blocks[b], b, lane0, lane1, x0, aux)
        if lane0 is None:
            return x
        m = self.lane_merge.to(dtype=lane0.dtype)
        return m * lane0 + (1.0 - m) * lane1


def _route(base: Tensor, attn_delta: Tensor, mlp_delta: Tensor, ra: float, rm: float) -> Tensor:
    """``base + ra·Δa + rm·Δm`` with frozen routes: a route of 0 adds nothing, a route of 1 no multiply."""
    out = base
    for r, delta in ((ra, attn_delta), (rm, mlp_delta)):
        if r != 0.0:
            out = out + (delta if r == 1.0 else r * delta)
    return out


def _decoder(host: nn.Module, layers: tuple[int, ...], params: ParallelLanesParams) -> LaneDecoder:
    schedule = host.schedule
    repeated = sorted(set(layers) & set(schedule.repeats)) if schedule is not None else []
    if repeated:
        raise ValueError(f"the topology's schedule repeats lane layers {repeated}; start the lanes after them")
    return LaneDecoder(layers, params)


class ParallelLanes:
    def __init__(self, params: ParallelLanesParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        if not layers:
            return
        n = spec.model.num_layers
        start = min(layers)
        if sorted(layers) != list(range(start, n)):
            raise ValueError(
                f"layers {sorted(layers)} are not a suffix: once split, the lanes run to the last block; select \"{start}:\""
            )
        p = self.params
        spec.replace("topology", None, "decoder", lambda host: _decoder(host, tuple(sorted(layers)), p), by=name)


def _from_start_layer(value: str):
    start = int(value)
    return f"{start}:" if start > 0 else []


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="parallel_lanes",
            slot="modifier",
            params=ParallelLanesParams,
            build=lambda params, ctx: ParallelLanes(params),
            summary="attention and MLP on split residual lanes from a decoder block on, no cross routes (frozen or learned), "
            "merged by a lane_merge scalar (records #1334, #1477)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-08_SP8192_ParallelResid_ScoreFirstTTT",
            example='[[modifier]]\nuse = "parallel_lanes"\nlayers = "-2:"\nmerge_init = 0.5',
            layers_env={"PARALLEL_START_LAYER": _from_start_layer},
        )
    )
