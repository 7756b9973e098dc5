"""A plugin module used only by the tests: an attention that reads a modifier option, and two modifiers."""

from __future__ import annotations

import attrs
from torch import Tensor

from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.attention.gqa import CausalSelfAttention, GQAParams


class ScaledAttention(CausalSelfAttention):
    def __init__(self, *args, out_scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out_scale = out_scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.out_scale


def build_scaled(params: GQAParams, ctx) -> ScaledAttention:
    m = ctx.model
    return ScaledAttention(m.model_dim, m.num_heads, m.num_kv_heads, params.rope_base, params.qk_gain_init, out_scale=ctx.option("out_scale", 1.0))


@attrs.define(frozen=True, kw_only=True)
class ScaleParams:
    factor: float = param(2.0, help="attention output multiplier")


class ScaleAttn:
    def __init__(self, params: ScaleParams) -> None:
        self.params = params

    def transform(self, spec, layers, name):
        for i in layers:
            spec.claim("attention", i, "out_scale", self.params.factor, by=name)


@attrs.define(frozen=True, kw_only=True)
class MultParams:
    mult: float = param(3.0)


class SetMlpMult:
    """Rewrites the MLP component's params of the selected layers (the last one in file order wins)."""

    def __init__(self, params: MultParams) -> None:
        self.params = params
        self.events: list[int] = []

    def transform(self, spec, layers, name):
        for i in layers:
            comp = spec.layers[i].mlp
            comp.params = attrs.evolve(comp.params, mult=self.params.mult)

    def on_step_end(self, state) -> None:
        self.events.append(state.step)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(Technique(name="gqa_scaled", slot="attention", params=GQAParams, build=build_scaled, summary="test attention"))
    register(Technique(name="scale_attn", slot="modifier", params=ScaleParams, build=lambda p, ctx: ScaleAttn(p), summary="test modifier"))
    register(Technique(name="set_mlp_mult", slot="modifier", params=MultParams, build=lambda p, ctx: SetMlpMult(p), summary="test modifier"))
