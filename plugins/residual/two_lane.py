"""Two-lane parallel blocks: an attention lane and an MLP lane, routed per layer and merged by a learned scalar.

From PR #1289 (``PARALLEL_START_LAYER``, ``records/track_10min_16mb/2026-04-02_PROTEUS_v16_Scylla``), the
variant PR #1392's README describes (its code ran the one-stream ``parallel_residual`` instead). The model
carries two streams, ``x_a`` and ``x_m``, equal until the first selected layer. In a selected block

* ``u_a = resid_mix[0]⊙x_a + resid_mix[1]⊙x0`` and ``Δa = attn_scale⊙Attn(norm(u_a)·s)``;
* ``u_m = resid_mix_mlp[0]⊙x_m + resid_mix_mlp[1]⊙x0`` and ``Δm = mlp_scale⊙MLP(norm(u_m)·s)``;
* ``x_a ← x_a + r0·Δa + r2·Δm`` and ``x_m ← x_m + r1·Δa + r3·Δm`` — the residual base is the raw lane, not u;

with ``resid_mix_mlp`` (2, d) initialised (1, 0) and ``route`` (4,) to ``route_init``. A block that is not
selected reads ``x_a`` and writes its output to both lanes. A decoder skip is added to ``x_a``, and also to
``x_m`` when the block is selected. After the last block ``x = m·x_a + (1 − m)·x_m`` with one scalar
``lane_merge`` initialised to ``merge_init``. ``resid_mix_mlp`` is a control tensor (as its name made it in
the reference); ``route`` and ``lane_merge`` are ordinary small weights.

Two parts carry it: each selected block's ``wiring`` (``LaneWiring``: the block's own ``resid_mix_mlp`` and
``route``, created right after its ``resid_mix`` as in PR #1289; a single-stream call runs the block
sequentially) and the topology's ``decoder`` (``TwoLaneDecoder``: the lanes, the skips, ``lane_merge``,
created after the skip weights). The U-Net encoder stores only ``x_a`` as its skip, so (as in PR #1289) every
selected layer must be a decoder layer, and none may be one the topology's schedule repeats.
``PARALLEL_START_LAYER=N`` selects layers ``N:``; 0 or less selects none (PR #1289's "off").
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import control
from pgolf_core.registry import Technique


def _four_routes(instance, attribute, value) -> None:
    if len(value) != 4:
        raise ValueError(f"{attribute.name} must have 4 values (aa, am, ma, mm), got {len(value)}")


@attrs.define(frozen=True, kw_only=True)
class TwoLaneParams:
    route_init: tuple[float, ...] = param(
        (1.0, 1.0, 1.0, 1.0), help="initial routes (attn→attn lane, attn→mlp lane, mlp→attn lane, mlp→mlp lane)",
        validator=_four_routes,
    )
    merge_init: float = param(0.5, help="initial lane_merge weight of the attention lane")


class LaneWiring(nn.Module):
    """A selected block's lane parameters and its two-lane step."""

    def __init__(self, dim: int, route_init: tuple[float, ...]) -> None:
        super().__init__()
        self.resid_mix_mlp = control(nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float()))
        self.route = nn.Parameter(torch.tensor([float(r) for r in route_init], dtype=torch.float32))

    def forward(self, block: nn.Module, x: Tensor, x0: Tensor, aux=None) -> Tensor:
        return block.sequential(x, x0, aux)

    def lanes(self, block: nn.Module, x_a: Tensor, x_m: Tensor, x0: Tensor, aux) -> tuple[Tensor, Tensor]:
        r = self.route.to(dtype=x_a.dtype)
        attn_delta = block.attn_delta(block.mix(x_a, x0), aux)
        mlp_delta = block.mlp_delta(block.mix_with(self.resid_mix_mlp, x_m, x0))
        return x_a + r[0] * attn_delta + r[2] * mlp_delta, x_m + r[1] * attn_delta + r[3] * mlp_delta


class TwoLaneDecoder(nn.Module):
    """The topology's decoder with lanes on ``layers``, merged by ``lane_merge`` after the last block."""

    def __init__(self, layers: tuple[int, ...], merge_init: float) -> None:
        super().__init__()
        self.layers = layers
        self.lane_merge = nn.Parameter(torch.tensor(float(merge_init), dtype=torch.float32))

    def forward(self, topo: nn.Module, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux, skips: list[Tensor]) -> Tensor:
        x_a, x_m = x, x
        for j, b in enumerate(topo.decoder_blocks()):
            lanes = b in self.layers
            if skips and j < topo.num_skips:
                skip = skips.pop()
                x_a = topo.add_skip(x_a, j, skip)
                if lanes:
                    x_m = topo.add_skip(x_m, j, skip)
            if lanes:
                x_a, x_m = blocks[b].wiring.lanes(blocks[b], x_a, x_m, x0, aux)
            else:
                x_a = topo.run(b, x_a, x0, blocks, aux)
                x_m = x_a
        m = self.lane_merge.to(dtype=x_a.dtype)
        return m * x_a + (1.0 - m) * x_m


def _decoder(host: nn.Module, layers: tuple[int, ...], merge_init: float) -> TwoLaneDecoder:
    schedule = host.schedule
    repeated = sorted(set(layers) & set(schedule.repeats)) if schedule is not None else []
    if repeated:
        raise ValueError(f"the topology's schedule repeats two-lane layers {repeated}; drop them from one modifier's layers")
    return TwoLaneDecoder(layers, merge_init)


class TwoLaneParallel:
    def __init__(self, params: TwoLaneParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        encoder = spec.model.num_layers // 2
        inside = [i for i in layers if i < encoder]
        if inside:
            raise ValueError(
                f"layers {inside} are in the encoder (layers 0-{encoder - 1}), whose U-Net skips store only the "
                f"attention lane; select decoder layers ({encoder}:)"
            )
        if not layers:
            return
        p = self.params
        for i in layers:
            # The block's wiring: parallel_residual on the same layer is reported as a conflict.
            spec.replace("residual", i, "wiring", lambda host: LaneWiring(host.dim, tuple(p.route_init)), by=name)
        spec.replace("topology", None, "decoder", lambda host: _decoder(host, tuple(layers), p.merge_init), by=name)


def _from_start_layer(value: str):
    start = int(value)
    return f"{start}:" if start > 0 else []


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="two_lane_parallel",
            slot="modifier",
            params=TwoLaneParams,
            build=lambda params, ctx: TwoLaneParallel(params),
            summary="two-lane parallel blocks with per-layer route, resid_mix_mlp and a learned lane_merge (PR #1289)",
            source="https://github.com/openai/parameter-golf/pull/1289",
            example='[[modifier]]\nuse = "two_lane_parallel"\nlayers = [7, 8, 9, 10]',
            layers_env={"PARALLEL_START_LAYER": _from_start_layer},
        )
    )
