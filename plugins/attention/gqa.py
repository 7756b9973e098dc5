"""Causal GQA self-attention with q/k RMSNorm, RoPE and a learned per-head query gain.

From the official baseline ``train_gpt.py`` (openai/parameter-golf): q, k, v projections (k/v with
``num_kv_heads`` heads), RMSNorm on q and k, rotary embedding, ``q *= q_gain``, SDPA with causal mask and
``enable_gqa``, zero-initialised output projection.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear, Rotary, apply_rotary_emb, zero_init
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class GQAParams:
    rope_base: float = param(10000.0, help="RoPE base frequency", env="ROPE_BASE", validator=positive)
    qk_gain_init: float = param(1.5, help="initial value of the per-head query gain", env="QK_GAIN_INIT")


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = zero_init(CastedLinear(dim, dim, bias=False))
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, base=rope_base)

    def forward(self, x: Tensor) -> Tensor:
        bsz, seqlen, dim = x.shape
        q = self.c_q(x).reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = self.rotary(seqlen, x.device, q.dtype)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, is_causal=True, enable_gqa=(self.num_kv_heads != self.num_heads)
        )
        y = y.transpose(1, 2).contiguous().reshape(bsz, seqlen, dim)
        return self.proj(y)


def build(params: GQAParams, ctx) -> CausalSelfAttention:
    m = ctx.model
    return CausalSelfAttention(m.model_dim, m.num_heads, m.num_kv_heads, params.rope_base, params.qk_gain_init)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="gqa",
            slot="attention",
            params=GQAParams,
            build=build,
            summary="causal GQA attention with q/k RMSNorm, RoPE and per-head q gain (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[attention]\nuse = "gqa"\nrope_base = 10000.0\nqk_gain_init = 1.5',
        )
    )
