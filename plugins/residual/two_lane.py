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
``lane_merge`` initialised to ``merge_init``. ``resid_mix_mlp`` and ``route`` go to the scalar Adam group.

The U-Net encoder stores only ``x_a`` as its skip, so (as in PR #1289) every selected layer must be a decoder
layer. ``PARALLEL_START_LAYER=N`` selects layers ``N:``; 0 or less selects none (PR #1289's "off").
"""

from __future__ import annotations

import attrs

from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
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


@attrs.define(frozen=True)
class LanesOption:
    """What the topology needs: which layers run two lanes, and the merge scalar's initial value."""

    layers: tuple[int, ...]
    merge_init: float


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
        for i in layers:
            # The same key as parallel_residual: both on one layer is reported as a conflict.
            spec.claim("residual", i, "parallel", ("two_lane", tuple(self.params.route_init)), by=name)
        spec.claim("topology", None, "lanes", LanesOption(tuple(layers), self.params.merge_init), by=name)


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
