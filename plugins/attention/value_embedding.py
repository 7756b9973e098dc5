"""Shared value embeddings (VE): a token table, projected to the KV width and scaled, added to the value
projection of selected layers, each with its own learned scale.

From PR #450 (``2026-03-22_12L_CatalyticResiduals_BigBigram``, layers 9 and 10 by default):
``ve = scale * proj(embed(ids))`` computed once per forward (a model-level module whose ``aux`` hands
``ve * s_j`` to the blocks); on layer j, the attention's ``qkv`` site adds it to v before the head split (so
XSA sees it too). ``embed`` is N(0, 0.01²) (drawn after its default N(0, 1)), ``proj``
zeroed (an orthogonal init slot re-initialises it, the reference's quirk), ``scale`` 0.1, ``s_j`` 1. The
module is created after the blocks, as in the reference, so the RNG order matches. ``scale`` and the ``s_j``
are control tensors (``ve_shared.scale``, ``ve_layer_scales`` in the references' name list).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear
from pgolf_core.model.roles import control
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ValueEmbeddingParams:
    dim: int = param(128, help="table width before projection to the KV width", env="VE_DIM", validator=positive)
    init_std: float = param(0.01, help="std of the table init", validator=positive)
    scale_init: float = param(0.1, help="initial shared output scale")


class ValueEmbedding(nn.Module):
    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int, layers: list[int], init_std: float, scale_init: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.proj = CastedLinear(ve_dim, kv_dim, bias=False) if ve_dim != kv_dim else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        self.scale = control(nn.Parameter(torch.tensor(scale_init, dtype=torch.float32)))
        self.layers = list(layers)
        self.ve_layer_scales = nn.ParameterList([control(nn.Parameter(torch.ones(1, dtype=torch.float32))) for _ in layers])

    def forward(self, token_ids: Tensor) -> Tensor:
        h = self.embed(token_ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(dtype=h.dtype)

    def aux(self, token_ids: Tensor) -> dict[str, Tensor]:
        ve = self(token_ids)
        return {f"ve_{layer}": ve * self.ve_layer_scales[i].to(dtype=ve.dtype) for i, layer in enumerate(self.layers)}


class AddValueEmbedding(nn.Module):
    """At the attention's ``qkv`` site: ``v += aux[key]``, this layer's scaled value embedding."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def forward(self, qkv: tuple[Tensor, Tensor, Tensor], x: Tensor, aux: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = qkv
        return q, k, v + aux[self.key]


class ValueEmbeddingModifier:
    def __init__(self, params: ValueEmbeddingParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        if not layers:
            return
        m = spec.model
        kv_dim = m.num_kv_heads * (m.model_dim // m.num_heads)
        p = self.params
        for i in layers:
            spec.install("attention", i, "qkv", lambda host, key=f"ve_{i}": AddValueEmbedding(key), by=name)
        spec.add_root_module(
            "ve_shared", lambda: ValueEmbedding(m.vocab_size, p.dim, kv_dim, layers, p.init_std, p.scale_init), by=name
        )


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="value_embedding",
            slot="modifier",
            params=ValueEmbeddingParams,
            build=lambda params, ctx: ValueEmbeddingModifier(params),
            summary="shared token table added (per-layer scaled) to the value projection of selected layers (PR #450)",
            source="https://github.com/openai/parameter-golf/pull/450",
            example='[[modifier]]\nuse = "value_embedding"\nlayers = [9, 10]\ndim = 128',
            enable_env="VE_ENABLED",
            layers_env={"VE_LAYERS": lambda v: [int(x) for x in v.split(",") if x.strip()]},
        )
    )
