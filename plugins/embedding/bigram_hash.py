"""BigramHash embedding: a hashed (previous, current) token pair looks up a small table, projected to the
model width and scaled, added to the token embedding before its RMSNorm (the embedding's ``lookup`` site).

From the #315 line of records (BigramHash 2048x128; PR #450 uses 10240 buckets). Bucket of position 0 is
``V-1``; otherwise ``(36313*t_i XOR 27191*t_{i-1}) mod (V-1)``. The table and the projection are created
zeroed (after drawing their default inits from the RNG, as the reference does); an orthogonal init slot may
later re-initialise the projection (the reference's ``bigram.proj`` quirk). ``scale`` starts at 0.05 and is a
control tensor, as in the references' name list (``bigram.scale``).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.config.fields import non_negative, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear
from pgolf_core.model.roles import control
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class BigramHashParams:
    vocab_size: int = param(2048, help="hash buckets; 0 disables", env="BIGRAM_VOCAB_SIZE", validator=non_negative)
    dim: int = param(128, help="table width before projection", env="BIGRAM_DIM", validator=positive)
    scale_init: float = param(0.05, help="initial output scale")


class BigramHashEmbedding(nn.Module):
    mixes_positions = True
    decode_aware = True  # keeps the last token for the next step (pgolf_core.model.decode)
    _decode = None

    def __init__(self, bigram_vocab_size: int, bigram_dim: int, model_dim: int, scale_init: float) -> None:
        super().__init__()
        self.bigram_vocab_size = bigram_vocab_size
        self.embed = nn.Embedding(bigram_vocab_size, bigram_dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(bigram_dim, model_dim, bias=False) if bigram_dim != model_dim else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        self.scale = control(nn.Parameter(torch.tensor(scale_init, dtype=torch.float32)))

    def bigram_hash(self, tokens: Tensor) -> Tensor:
        t = tokens.to(torch.int32)
        mod = self.bigram_vocab_size - 1
        out = torch.empty_like(t)
        out[..., 0] = mod
        out[..., 1:] = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % mod
        return out.long()

    def forward(self, x: Tensor, token_ids: Tensor) -> Tensor:
        """At the ``lookup`` site: the token embedding ``x`` plus this pair embedding."""
        return x + self.embed_pairs(token_ids)

    def embed_pairs(self, token_ids: Tensor) -> Tensor:
        if self._decode is not None:
            st = self._decode.state(self)
            prev = st.get("last")
            st["last"] = token_ids[..., -1:]
            if prev is not None:  # hash the first new token with the previous one, not as position 0
                h = self.embed(self.bigram_hash(torch.cat([prev, token_ids], dim=-1))[..., 1:])
                return self._project(h)
        return self._project(self.embed(self.bigram_hash(token_ids)))

    def _project(self, h: Tensor) -> Tensor:
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(dtype=h.dtype)


class BigramHash:
    def __init__(self, params: BigramHashParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        p = self.params
        if p.vocab_size == 0:
            return  # the reference's BIGRAM_VOCAB_SIZE=0: no table
        if p.vocab_size < 2:
            raise ValueError("vocab_size must be 0 (off) or >= 2")
        spec.install("embedding", None, "lookup", lambda host: BigramHashEmbedding(p.vocab_size, p.dim, host.dim, p.scale_init), by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="bigram_hash",
            slot="modifier",
            params=BigramHashParams,
            build=lambda params, ctx: BigramHash(params),
            summary="hashed bigram embedding (table -> projection -> scale) added before the embedding norm",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "bigram_hash"\nvocab_size = 2048\ndim = 128',
        )
    )
