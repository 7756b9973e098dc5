"""GPTQ of the tied embedding: the token table, which the tied head applies to the final hidden state, gets a
Hessian from that hidden state, so a Hessian-aware quantizer treats it like any other matrix (PR #1394,
"GPTQ-Embeddings"; int8 there, int7 from #1626 on).

The record's ``collect_hessians`` adds, for a tied model, a forward hook on ``final_norm`` (on ``head_proj`` when
the embedding has its own width) whose *output* ``x`` (flattened to (N, d), fp32) is accumulated as
``H += xᵀx`` under the name ``tok_emb.weight``, divided by the number of calibration forwards like the others.
The head computes ``logits = x · Eᵀ``: each vocabulary row of ``E`` is a linear map of ``x``, so ``H`` is the
GPTQ Hessian of ``E``'s columns. This modifier registers that tap on the model (``model.hessian_taps``, which
the core's ``collect_hessians`` reads); the quantizer decides the table's bits and clip (``sdclip``:
``embed_bits``, ``embed_clip_sigmas``). An untied head has its own linear layer, whose input is the same hidden
state: nothing to add, and the modifier does nothing.
"""

from __future__ import annotations

import attrs

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class TiedEmbeddingGPTQParams:
    """No parameters: the tap is the final hidden state (the head's input)."""


def token_table_name(model) -> str | None:
    """The state_dict name of the token table the head multiplies by (None when the head is untied)."""
    head = model.head
    if getattr(head, "lm_head", None) is not None:
        return None
    table = model.embedding.tok_emb.weight
    return next((n for n, p in model.named_parameters() if p is table), None)


class TiedEmbeddingGPTQ:
    def __init__(self, params: TiedEmbeddingGPTQParams) -> None:
        self.params = params
        self.weight_name: str | None = None

    def transform(self, spec, layers, name) -> None:
        """Nothing to change in the model's structure: the tap is registered when the model exists."""

    def attach(self, model) -> None:
        self.weight_name = token_table_name(model)
        if self.weight_name is not None:
            model.hessian_taps[self.weight_name] = model.final_norm


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="tied_embedding_gptq",
            slot="modifier",
            params=TiedEmbeddingGPTQParams,
            build=lambda params, ctx: TiedEmbeddingGPTQ(params),
            summary="Hessian of the final hidden state for the tied token table, so GPTQ quantizes it (PR #1394)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2",
            example='[[modifier]]\nuse = "tied_embedding_gptq"',
        )
    )
