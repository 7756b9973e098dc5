"""Baseline weight init: N(0, std) tied embedding, zeroed output projections, PyTorch defaults elsewhere.

From the official baseline ``train_gpt.py`` (``GPT._init_weights``). It runs after every module was built,
so the RNG draws happen in the reference's order: default inits during construction, then this.
"""

from __future__ import annotations

import attrs
from torch import nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class BaselineInitParams:
    tied_embed_init_std: float = param(
        0.005, help="std of the token embedding init when embeddings are tied", env="TIED_EMBED_INIT_STD", validator=positive
    )


def build(params: BaselineInitParams, ctx):
    tied = ctx.model.tie_embeddings

    def init(model: nn.Module) -> None:
        if tied:
            nn.init.normal_(model.token_embedding(), mean=0.0, std=params.tied_embed_init_std)
        for module in model.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    return init


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="baseline",
            slot="init",
            params=BaselineInitParams,
            build=build,
            summary="normal init of the tied embedding, zero-init of flagged projections (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[init]\nuse = "baseline"\ntied_embed_init_std = 0.005',
        )
    )
