"""Output head with tanh logit soft-capping and mean cross-entropy.

From the official baseline ``train_gpt.py``: logits = ``cap * tanh(x W^T / cap)`` with W the token
embedding when ``model.tie_embeddings`` (else an untied zero-initialised ``lm_head``); loss in fp32.
Optional focal loss (PR #1319, ``FOCAL_GAMMA``): ``mean((1 - p_t)^gamma * CE_t)`` in training.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import non_negative, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear, zero_init
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SoftcapParams:
    logit_softcap: float = param(30.0, help="tanh soft cap on the logits", env="LOGIT_SOFTCAP", validator=positive)
    focal_gamma: float = param(
        0.0,
        help="focal loss exponent: loss = mean((1 - p_t)^gamma * CE_t), p_t = exp(-CE_t) not detached; 0 is plain CE (PR #1319 used 1.0)",
        env="FOCAL_GAMMA",
        validator=non_negative,
    )
    focal_in_eval: bool = param(
        True,
        help="also use the focal loss for periodic validation and the pre-quantization diagnostic, as PR #1319 did "
        "(its 'val_bpb' there is not CE-based); the final scores are always plain CE",
    )


class SoftcapHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int, tied: bool, logit_softcap: float, focal_gamma: float = 0.0, focal_in_eval: bool = True) -> None:
        super().__init__()
        self.logit_softcap = logit_softcap
        self.focal_gamma = focal_gamma
        self.focal_in_eval = focal_in_eval  # Python flags: the compiled graph specialises on them
        self.lm_head = None if tied else zero_init(CastedLinear(dim, vocab_size, bias=False))

    def logits(self, x: Tensor, tok_weight: Tensor) -> Tensor:
        x = x.reshape(-1, x.size(-1))
        proj = F.linear(x, tok_weight) if self.lm_head is None else self.lm_head(x)
        return self.logit_softcap * torch.tanh(proj / self.logit_softcap)

    def forward(self, x: Tensor, target_ids: Tensor, tok_weight: Tensor) -> Tensor:
        logits = self.logits(x, tok_weight)
        if self.focal_gamma > 0 and (self.training or self.focal_in_eval):
            ce = F.cross_entropy(logits.float(), target_ids.reshape(-1), reduction="none")
            return ((1 - torch.exp(-ce)) ** self.focal_gamma * ce).mean()
        return F.cross_entropy(logits.float(), target_ids.reshape(-1), reduction="mean")

    def prepare_final_eval(self) -> None:
        """The final scores are cross-entropy: PR #1319 rebuilt its round-trip model without focal loss."""
        self.focal_in_eval = False


def build(params: SoftcapParams, ctx) -> SoftcapHead:
    m = ctx.model
    return SoftcapHead(m.model_dim, m.vocab_size, m.tie_embeddings, params.logit_softcap, params.focal_gamma, params.focal_in_eval)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="softcap",
            slot="head",
            params=SoftcapParams,
            build=build,
            summary="tied (or untied) output head with tanh logit softcap, fp32 cross-entropy (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[head]\nuse = "softcap"\nlogit_softcap = 30.0',
        )
    )
