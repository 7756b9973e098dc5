"""Causal GQA self-attention with q/k RMSNorm, RoPE and a learned per-head query gain.

From the official baseline ``train_gpt.py`` (openai/parameter-golf): q, k, v projections (k/v with
``num_kv_heads`` heads), RMSNorm on q and k, rotary embedding, ``q *= q_gain``, SDPA with causal mask and
``enable_gqa``, zero-initialised output projection.

Sites (each module receives the previous one's output first; see ``pgolf_core.model.sites``):

* ``qkv``: the projections' outputs before the heads split (value embeddings add to v, Canon B convolves);
* ``heads_out``: each head's output before the heads merge, with the values it attended (XSA, output gates);
* ``out``: the output projection's result.

Part ``rotary``: the RoPE tables and rotation (partial RoPE replaces it). While a ``DecodeCache`` is set
(``pgolf_core.model.decode``), the attention keeps pre-RoPE keys and values and attends from the new
positions only: self-generated calibration samples with it.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import CastedLinear, Rotary, zero_init
from pgolf_core.model.roles import control
from pgolf_core.model.sites import NO_SITES, SiteBuilder
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class GQAParams:
    rope_base: float = param(10000.0, help="RoPE base frequency", env="ROPE_BASE", validator=positive)
    qk_gain_init: float = param(1.5, help="initial value of the per-head query gain", env="QK_GAIN_INIT")


class CausalSelfAttention(nn.Module):
    SITES = {
        "qkv": "((q (B,T,d), k (B,T,dkv), v (B,T,dkv)), x (B,T,d), aux) -> (q, k, v): the projections, before the heads split",
        "heads_out": "(y (B,T,H,D), v (B,T,Hkv,D), x (B,T,d), aux) -> y: each head's output before the heads merge",
        "out": "(y (B,T,d), x (B,T,d), aux) -> y: after the output projection",
    }
    PARTS = {"rotary": "nn.Module: (seq_len, device, dtype) -> (cos, sin); apply(x, cos, sin) -> x (default: the baseline's Rotary)"}
    mixes_positions = True
    decode_aware = True  # a KV cache of pre-RoPE keys (pgolf_core.model.decode)
    _decode = None

    def __init__(
        self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float, sites: SiteBuilder = NO_SITES
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.rope_base = rope_base
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, self.kv_dim, bias=False)
        self.c_v = CastedLinear(dim, self.kv_dim, bias=False)
        self.proj = zero_init(CastedLinear(dim, dim, bias=False))
        self.q_gain = control(nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32)))
        self.rotary = sites.part("rotary", self) or Rotary(self.head_dim, base=rope_base)
        self.qkv = sites.site("qkv", self)
        self.heads_out = sites.site("heads_out", self)
        self.out = sites.site("out", self)

    def forward(self, x: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        bsz, seqlen, dim = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if self.qkv is not None:
            q, k, v = self.qkv((q, k, v), x, aux)
        q = q.reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        if self._decode is not None:
            y = self._attend_cached(q, k, v)
        else:
            cos, sin = self.rotary(seqlen, x.device, q.dtype)
            q = self.rotary.apply(q, cos, sin)
            k = self.rotary.apply(k, cos, sin)
            q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, is_causal=True, enable_gqa=(self.num_kv_heads != self.num_heads)
            )
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.heads_out is not None:
            y = self.heads_out(y, v.transpose(1, 2), x, aux)
        y = self.proj(y.contiguous().reshape(bsz, seqlen, dim))
        if self.out is not None:
            y = self.out(y, x, aux)
        return y

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Incremental decoding: append the new (pre-RoPE) keys and values, rotate every key with the tables of
        the current length (NTK RoPE's base depends on it), attend from the new positions."""
        st = self._decode.state(self)
        if "k" in st:
            k = torch.cat([st["k"], k], dim=2)
            v = torch.cat([st["v"], v], dim=2)
        st["k"], st["v"] = k, v
        total, new = k.size(2), q.size(2)
        cos, sin = self.rotary(total, q.device, q.dtype)
        q = self.rotary.apply(q, cos[:, :, total - new :], sin[:, :, total - new :])
        k = self.rotary.apply(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        mask = None
        if new > 1:  # the new positions see the cache and, causally, each other
            mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=total - new)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=(self.num_kv_heads != self.num_heads))


def build(params: GQAParams, ctx) -> CausalSelfAttention:
    m = ctx.model
    return CausalSelfAttention(m.model_dim, m.num_heads, m.num_kv_heads, params.rope_base, params.qk_gain_init, ctx)


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
