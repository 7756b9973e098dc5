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


class BaselineInit:
    writes_block_weights = False  # the blocks keep their constructors' default inits

    def __init__(self, params: BaselineInitParams, tied: bool) -> None:
        self.params, self.tied = params, tied

    def __call__(self, model: nn.Module) -> None:
        if self.tied:
            nn.init.normal_(model.token_embedding(), mean=0.0, std=self.params.tied_embed_init_std)
        for module in model.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)


def build(params: BaselineInitParams, ctx) -> BaselineInit:
    return BaselineInit(params, ctx.model.tie_embeddings)


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
