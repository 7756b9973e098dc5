"""Token embedding followed by RMSNorm: the input path of the official baseline ``train_gpt.py``.

The table is created first in the model (its default N(0, 1) init draws from the RNG before anything else);
the init slot later re-draws it with the tied-embedding std. Two sites, each ``(x, input_ids) -> x``:
``lookup`` on the table lookup before the norm (BigramHash adds there) and ``x0`` on the normed output, the
stream every block mixes back in (SmearGate). Their modules are created after the table, in that order, as
in the #315 line of records.
"""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.sites import NO_SITES, SiteBuilder
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class TokenEmbeddingParams:
    """No parameters: vocabulary and width come from [model]."""


class TokenEmbedding(nn.Module):
    SITES = {
        "lookup": "(x (B,T,d), input_ids (B,T)) -> x: the table lookup, before the RMSNorm",
        "x0": "(x (B,T,d), input_ids (B,T)) -> x: after the RMSNorm; the result is the blocks' x0",
    }

    def __init__(self, vocab_size: int, dim: int, sites: SiteBuilder = NO_SITES) -> None:
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.lookup = sites.site("lookup", self)
        self.x0 = sites.site("x0", self)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.lookup is not None:
            x = self.lookup(x, input_ids)
        x = F.rms_norm(x, (x.size(-1),))
        if self.x0 is not None:
            x = self.x0(x, input_ids)
        return x


def build(params: TokenEmbeddingParams, ctx) -> TokenEmbedding:
    return TokenEmbedding(ctx.model.vocab_size, ctx.model.model_dim, ctx)


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
