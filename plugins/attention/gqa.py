"""Causal GQA self-attention with q/k RMSNorm, RoPE and a learned per-head query gain.

From the official baseline ``train_gpt.py`` (openai/parameter-golf): q, k, v projections (k/v with
``num_kv_heads`` heads), RMSNorm on q and k, rotary embedding, ``q *= q_gain``, SDPA with causal mask and
``enable_gqa``, zero-initialised output projection.

Options modifiers may set (see ``pgolf_core.model.spec``): ``rope`` = (rope_dims, ntk_seq_len) from
``partial_rope``; ``xsa`` = XSA settings from ``xsa``; ``value_embed`` = the ``aux`` key of a tensor added
to the value projection (from ``value_embedding``); ``canon_b`` = factory of a module applied to
concat(q, k, v) right after the projections (from ``canon``).
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


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own (unit) value vector.

    ``y``: (B, H, T, D) attention output; ``v``: (B, Hkv, T, D). Query head h uses KV head h // (H/Hkv).
    """
    bsz, heads, seqlen, dim = y.shape
    kv_heads = v.size(1)
    y_g = y.reshape(bsz, kv_heads, heads // kv_heads, seqlen, dim)
    vn = F.normalize(v, dim=-1).unsqueeze(2)
    proj = (y_g * vn).sum(dim=-1, keepdim=True) * vn
    return (y_g - proj).reshape(bsz, heads, seqlen, dim)


class CausalSelfAttention(nn.Module):
    mixes_positions = True
    decode_aware = True  # a KV cache of pre-RoPE keys (pgolf_core.model.decode)
    _decode = None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        rope_base: float,
        qk_gain_init: float,
        rope_dims: int = 0,
        ntk_seq_len: int = 0,
        xsa: bool = False,
        xsa_gate_init: float | None = None,
        value_embed_key: str | None = None,
        canon_b=None,
    ) -> None:
        super().__init__()
        self.value_embed_key = value_embed_key
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = zero_init(CastedLinear(dim, dim, bias=False))
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, base=rope_base, rope_dims=rope_dims, ntk_seq_len=ntk_seq_len)
        self.use_xsa = xsa
        self.xsa_gate = nn.Parameter(torch.tensor(xsa_gate_init, dtype=torch.float32)) if xsa and xsa_gate_init is not None else None
        self.canon_b = canon_b() if canon_b is not None else None

    def forward(self, x: Tensor, aux: dict[str, Tensor] | None = None) -> Tensor:
        bsz, seqlen, dim = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if self.value_embed_key is not None and aux is not None:
            v = v + aux[self.value_embed_key]
        if self.canon_b is not None:
            kv_dim = self.num_kv_heads * self.head_dim
            q, k, v = self.canon_b(torch.cat([q, k, v], dim=-1)).split((dim, kv_dim, kv_dim), dim=-1)
        q = q.reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        if self._decode is not None:
            y = self._attend_cached(q, k, v)
        else:
            cos, sin = self.rotary(seqlen, x.device, q.dtype)
            q = apply_rotary_emb(q, cos, sin)
            k = apply_rotary_emb(k, cos, sin)
            q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, is_causal=True, enable_gqa=(self.num_kv_heads != self.num_heads)
            )
        if self.use_xsa:
            y_xsa = exclusive_self_attention(y, v)
            if self.xsa_gate is not None:
                y = y + torch.sigmoid(self.xsa_gate.to(dtype=y.dtype)) * (y_xsa - y)
            else:
                y = y_xsa
        y = y.transpose(1, 2).contiguous().reshape(bsz, seqlen, dim)
        return self.proj(y)

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
        q = apply_rotary_emb(q, cos[:, :, total - new :], sin[:, :, total - new :])
        k = apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        mask = None
        if new > 1:  # the new positions see the cache and, causally, each other
            mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=total - new)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=(self.num_kv_heads != self.num_heads))


def build(params: GQAParams, ctx) -> CausalSelfAttention:
    m = ctx.model
    rope_dims, ntk_seq_len = ctx.option("rope", (0, 0))
    xsa = ctx.option("xsa")
    return CausalSelfAttention(
        m.model_dim,
        m.num_heads,
        m.num_kv_heads,
        params.rope_base,
        params.qk_gain_init,
        rope_dims=rope_dims,
        ntk_seq_len=ntk_seq_len,
        xsa=xsa is not None,
        xsa_gate_init=xsa.gate_init if xsa is not None and xsa.learnable_gate else None,
        value_embed_key=ctx.option("value_embed"),
        canon_b=ctx.option("canon_b"),
    )


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
