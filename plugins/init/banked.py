"""Orthogonal init in parameter-bank order, as the Parallel-Muon line of records initialised its banks.

PR #399 stacked the block matrices into four banks allocated with ``torch.empty`` (PR #549, the #1019
record and PR #1392 keep them). Their ``_init_weights`` draws, after the tied embedding's N(0, std), for
each layer i in order: ``orthogonal(q_i)``, ``zeros(out_i)``, ``orthogonal(k_i)``, ``orthogonal(v_i)``,
``orthogonal(up_i)``, ``zeros(down_i)``; then every other ``nn.Linear`` (BigramHash and value-embedding
projections) in module order: zeros if flagged zero-init, orthogonal if both dims are at least ``min_dim``,
otherwise left as built. No ``1/sqrt(2L)`` factor lands anywhere (it multiplies the zero matrices).

pgolf keeps per-layer modules (``blocks.i.attn.c_q`` …) and builds them without their constructor's
kaiming draw (``writes_block_weights``), so this init consumes the RNG exactly as the banks did and the
same seed gives the same weights.
"""

from __future__ import annotations

import attrs
from torch import nn

from pgolf_core.config.fields import param, positive
from pgolf_core.errors import ConfigError
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique

BANK_ORDER = (("attn", "c_q", "orthogonal"), ("attn", "proj", "zeros"), ("attn", "c_k", "orthogonal"),
              ("attn", "c_v", "orthogonal"), ("mlp", "fc", "orthogonal"), ("mlp", "proj", "zeros"))


@attrs.define(frozen=True, kw_only=True)
class BankedInitParams:
    tied_embed_init_std: float = param(0.005, help="std of the tied token embedding", env="TIED_EMBED_INIT_STD", validator=positive)
    min_dim: int = param(64, help="linears outside the blocks get an orthogonal init only when both dims are at least this", validator=positive)


class BankedOrthogonalInit:
    writes_block_weights = True  # blocks are built without constructor draws; every block matrix is set here

    def __init__(self, params: BankedInitParams, tied: bool) -> None:
        self.params = params
        self.tied = tied

    def __call__(self, model: nn.Module) -> None:
        if self.tied:
            nn.init.normal_(model.token_embedding(), mean=0.0, std=self.params.tied_embed_init_std)
        done: set[int] = set()
        for i, block in enumerate(model.blocks):
            for part, name, how in BANK_ORDER:
                linear = getattr(getattr(block, part, None), name, None)
                if not isinstance(linear, nn.Linear):
                    raise ConfigError(
                        f"init 'banked_orthogonal' needs blocks.{i}.{part}.{name} (the gqa attention and relu2 MLP layout); "
                        "use init 'orthogonal' with other block techniques"
                    )
                if how == "zeros":
                    nn.init.zeros_(linear.weight)
                else:
                    nn.init.orthogonal_(linear.weight, gain=1.0)
                done.add(id(linear))
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module) not in done:
                if getattr(module, "_zero_init", False):
                    nn.init.zeros_(module.weight)
                elif module.weight.ndim == 2 and min(module.weight.shape) >= self.params.min_dim:
                    nn.init.orthogonal_(module.weight, gain=1.0)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="banked_orthogonal",
            slot="init",
            params=BankedInitParams,
            build=lambda params, ctx: BankedOrthogonalInit(params, ctx.model.tie_embeddings),
            summary="orthogonal init drawn in parameter-bank order (q, out=0, k, v, up, down=0 per layer) (PR #399/#549 line)",
            source="https://github.com/openai/parameter-golf/pull/399",
            example='[init]\nuse = "banked_orthogonal"',
        )
    )
