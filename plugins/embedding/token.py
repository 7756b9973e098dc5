"""Token embedding followed by RMSNorm: the input path of the official baseline ``train_gpt.py``.

The table is created first in the model (its default N(0, 1) init draws from the RNG before anything else);
the init slot later re-draws it with the tied-embedding std.
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
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        return F.rms_norm(x, (x.size(-1),))


def build(params: TokenEmbeddingParams, ctx) -> TokenEmbedding:
    return TokenEmbedding(ctx.model.vocab_size, ctx.model.model_dim)


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
