"""Parallel (GPT-J-style) blocks: attention and MLP read the same mixed input and add to one stream.

As PR #1392 ran it (``PARALLEL_START_LAYER=7``, after PR #1204): for the chosen layers,
``out = x_in + attn_scale ⊙ Attn(norm(x_in)·s) + mlp_scale ⊙ MLP(norm(x_in)·s)`` where ``x_in`` is the
``resid_mix`` mix of the stream and x0 and ``s`` the LN scale. Replaces the block's ``wiring`` part; no new
parameters, one residual stream, the U-Net skip added before the block as usual. (The two-lane
``lane_merge`` / ``resid_mix_mlp`` variant that PR #1392's README describes is PR #1289's, not what its code
ran: ``two_lane_parallel``.)

``PARALLEL_START_LAYER=N`` (``PARALLEL_RESIDUAL_START`` in #1493) selects layers ``N:``; a negative value selects
none. Under a sequential view (GPTQ's ``hessian_model = "sequential"``) the chosen blocks run sequentially, as PR
#1392's Hessian model did.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import attrs
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ParallelResidualParams:
    """No parameters: the layers come from the modifier's ``layers`` selector."""


class ParallelWiring(nn.Module):
    """``u = mix(x, x0); u + attn_delta(u) + mlp_delta(u)``."""

    def forward(self, block: nn.Module, x: Tensor, x0: Tensor, aux=None) -> Tensor:
        u = block.mix(x, x0)
        return u + block.attn_delta(u, aux) + block.mlp_delta(u)


class ParallelResidual:
    def __init__(self) -> None:
        self.blocks: list[nn.Module] = []

    def transform(self, spec, layers, name) -> None:
        for i in layers:
            spec.replace("residual", i, "wiring", lambda host: ParallelWiring(), by=name)

    def attach(self, model) -> None:
        self.blocks = [b for b in model.blocks if isinstance(getattr(b, "wiring", None), ParallelWiring)]

    @contextlib.contextmanager
    def sequential_view(self) -> Iterator[None]:
        saved = [(b, b.wiring) for b in self.blocks]
        try:
            for block, _ in saved:
                block.wiring = None
            yield
        finally:
            for block, wiring in saved:
                block.wiring = wiring


def _from_start_layer(value: str):
    start = int(value)
    return f"{start}:" if start >= 0 else []


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="parallel_residual",
            slot="modifier",
            params=ParallelResidualParams,
            build=lambda params, ctx: ParallelResidual(),
            summary="GPT-J-style parallel attention+MLP on one residual stream for the chosen layers (PR #1392)",
            source="https://github.com/openai/parameter-golf/pull/1392",
            example='[[modifier]]\nuse = "parallel_residual"\nlayers = "7:"',
            layers_env={"PARALLEL_START_LAYER": _from_start_layer, "PARALLEL_RESIDUAL_START": _from_start_layer},
        )
    )
