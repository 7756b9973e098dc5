"""Output head with tanh logit soft-capping (official baseline).

From the official baseline ``train_gpt.py``: logits = ``cap * tanh(x W^T / cap)`` with W the token embedding
when ``model.tie_embeddings`` (else an untied zero-initialised ``lm_head``). The loss is the ``loss`` slot's.
``project`` (before the cap) and ``cap`` are public so evaluators that adapt the logits (SLOT) reuse them.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear, zero_init
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SoftcapParams:
    logit_softcap: float = param(30.0, help="tanh soft cap on the logits", env="LOGIT_SOFTCAP", validator=positive)


class SoftcapHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int, tied: bool, logit_softcap: float) -> None:
        super().__init__()
        self.logit_softcap = logit_softcap
        self.lm_head = None if tied else zero_init(CastedLinear(dim, vocab_size, bias=False))

    def output_weight(self, tok_weight: Tensor) -> Tensor:
        """The (V, d) matrix the logits are computed with: the token table when tied, else ``lm_head``'s."""
        return tok_weight if self.lm_head is None else self.lm_head.weight

    def project(self, x: Tensor, tok_weight: Tensor) -> Tensor:
        x = x.reshape(-1, x.size(-1))
        return F.linear(x, tok_weight) if self.lm_head is None else self.lm_head(x)

    def cap(self, z: Tensor) -> Tensor:
        return self.logit_softcap * torch.tanh(z / self.logit_softcap)

    def logits(self, x: Tensor, tok_weight: Tensor) -> Tensor:
        return self.cap(self.project(x, tok_weight))


def build(params: SoftcapParams, ctx) -> SoftcapHead:
    m = ctx.model
    return SoftcapHead(m.model_dim, m.vocab_size, m.tie_embeddings, params.logit_softcap)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="softcap",
            slot="head",
            params=SoftcapParams,
            build=build,
            summary="tied (or untied) output head with tanh logit softcap (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[head]\nuse = "softcap"\nlogit_softcap = 30.0',
        )
    )
