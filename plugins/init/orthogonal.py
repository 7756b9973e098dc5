"""OrthoInit with muP-scaled projections, as in the #315 line of records (``GPT._init_weights``).

After every module was built: the tied embedding is drawn N(0, std); then, for each ``nn.Linear`` in
``named_modules()`` order, a zero-init flag zeroes it, otherwise a weight with both dims >= ``min_dim`` gets
an orthogonal init and, when its name ends in ``.proj`` (or contains ``.proj.``), a ``1/sqrt(2 L)`` factor.
Because the block output projections are zero-init flagged, the factor lands only on projections outside
the blocks (``bigram.proj``, ``ve_shared.proj``): a quirk the records depend on, kept as is.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class OrthogonalInitParams:
    tied_embed_init_std: float = param(0.005, help="std of the tied token embedding", env="TIED_EMBED_INIT_STD", validator=positive)
    min_dim: int = param(64, help="orthogonal init only when both weight dims are at least this", validator=positive)
    scale_projections: bool = param(True, help="multiply '.proj' weights by 1/sqrt(2 * num_layers)")


class OrthogonalInit:
    writes_block_weights = False  # every linear is drawn again here, after its constructor's draw

    def __init__(self, params: OrthogonalInitParams, tied: bool, num_layers: int) -> None:
        self.params, self.tied, self.num_layers = params, tied, num_layers

    def __call__(self, model: nn.Module) -> None:
        params = self.params
        if self.tied:
            nn.init.normal_(model.token_embedding(), mean=0.0, std=params.tied_embed_init_std)
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)
            elif module.weight.ndim == 2 and min(module.weight.shape) >= params.min_dim:
                nn.init.orthogonal_(module.weight, gain=1.0)
                if params.scale_projections and (".proj." in name or name.endswith(".proj")):
                    with torch.no_grad():
                        module.weight.mul_(1.0 / math.sqrt(2 * self.num_layers))


def build(params: OrthogonalInitParams, ctx) -> OrthogonalInit:
    return OrthogonalInit(params, ctx.model.tie_embeddings, ctx.model.num_layers)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="orthogonal",
            slot="init",
            params=OrthogonalInitParams,
            build=build,
            summary="orthogonal init of large linears, 1/sqrt(2L) on '.proj' outside zero-init blocks (#315 line)",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[init]\nuse = "orthogonal"\ntied_embed_init_std = 0.005',
        )
    )
