"""XSA (exclusive self attention) on selected layers: subtract each head output's projection on the
token's own value vector, ``y <- y - (y . v_hat) v_hat``.

Introduced to the challenge in the 11-layer records (arXiv:2603.09078), used on the last 4 layers by the
#315 record (``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``) and PRs #400/#450. PR #400 adds an
optional learnable gate ``y <- y + sigmoid(g) (y_xsa - y)`` (off in its run). Acts at the attention's
``heads_out`` site, so it sees the values after anything installed at ``qkv`` (value embeddings).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import control
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class XSAParams:
    learnable_gate: bool = param(False, help="interpolate with a learned sigmoid gate (PR #400 option)", env="XSA_LEARNABLE_GATE")
    gate_init: float = param(2.0, help="initial gate logit when learnable_gate", env="XSA_GATE_INIT")


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """Remove from each head's output its component along the token's own (unit) value vector.

    ``y``: (B, T, H, D) attention output; ``v``: (B, T, Hkv, D). Query head h uses KV head h // (H/Hkv).
    """
    bsz, seqlen, heads, dim = y.shape
    kv_heads = v.size(2)
    y_g = y.reshape(bsz, seqlen, kv_heads, heads // kv_heads, dim)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    proj = (y_g * vn).sum(dim=-1, keepdim=True) * vn
    return (y_g - proj).reshape(bsz, seqlen, heads, dim)


class ExclusiveSelfAttention(nn.Module):
    """At ``heads_out``: ``(y, v, x, aux) -> y`` with the own-value component removed (optionally gated)."""

    def __init__(self, gate_init: float | None = None) -> None:
        super().__init__()
        # The gate is a control tensor (``xsa_gate`` in PR #400's name list).
        self.gate = control(nn.Parameter(torch.tensor(gate_init, dtype=torch.float32))) if gate_init is not None else None

    def forward(self, y: Tensor, v: Tensor, x: Tensor, aux=None) -> Tensor:
        y_xsa = exclusive_self_attention(y, v)
        if self.gate is None:
            return y_xsa
        return y + torch.sigmoid(self.gate.to(dtype=y.dtype)) * (y_xsa - y)


class XSA:
    def __init__(self, params: XSAParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        gate = self.params.gate_init if self.params.learnable_gate else None
        for i in layers:
            spec.install("attention", i, "heads_out", lambda host: ExclusiveSelfAttention(gate), by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="xsa",
            slot="modifier",
            params=XSAParams,
            build=lambda params, ctx: XSA(params),
            summary="exclusive self attention: remove the own-value component from attention outputs",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "xsa"\nlayers = "last 4"',
            layers_env={"XSA_LAST_N": lambda v: f"last {int(v)}"},
        )
    )
