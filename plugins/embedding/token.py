"""Token embedding followed by RMSNorm: the input path of the official baseline ``train_gpt.py``.

The table is created first in the model (its default N(0, 1) init draws from the RNG before anything else);
the init slot later re-draws it with the tied-embedding std.

Options modifiers may set: ``input_addend`` = (name, factory) for a module added to the table lookup before
the norm (BigramHash), ``post_norm`` = (name, factory) for a transform after it (SmearGate). The modules
are created in that order, after the table, as in the #315 line of records.
"""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class TokenEmbeddingParams:
    """No parameters: vocabulary and width come from [model]."""


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, input_addend=None, post_norm=None) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.addend_name = self.post_name = None
        if input_addend is not None:
            self.addend_name = input_addend[0]
            self.add_module(input_addend[0], input_addend[1]())
        if post_norm is not None:
            self.post_name = post_norm[0]
            self.add_module(post_norm[0], post_norm[1]())

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.addend_name is not None:
            x = x + getattr(self, self.addend_name)(input_ids)
        x = F.rms_norm(x, (x.size(-1),))
        if self.post_name is not None:
            x = getattr(self, self.post_name)(x)
        return x


def build(params: TokenEmbeddingParams, ctx) -> TokenEmbedding:
    return TokenEmbedding(ctx.model.vocab_size, ctx.model.model_dim, ctx.option("input_addend"), ctx.option("post_norm"))


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="token",
            slot="embedding",
            params=TokenEmbeddingParams,
            build=build,
            summary="token embedding table followed by RMSNorm (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[embedding]\nuse = "token"',
        )
    )
