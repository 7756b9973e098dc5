"""Causal GQA self-attention with q/k RMSNorm, RoPE and a learned per-head query gain.

From the official baseline ``train_gpt.py`` (openai/parameter-golf): q, k, v projections (k/v with
``num_kv_heads`` heads), RMSNorm on q and k, rotary embedding, ``q *= q_gain``, SDPA with causal mask and
``enable_gqa``, zero-initialised output projection.

The kernel: when ``flash_attn_interface`` imports (FlashAttention-3), attention calls its ``flash_attn_func``
as the records from #315 on do (``flash_attn_3_func(q, k, v, causal=True)``): q, k, v in (B, T, H, D) and
(B, T, Hkv, D) layout, the KV heads as they are (FA3 maps query head h to KV head h // (H/Hkv), as SDPA's
``enable_gqa`` does), in the activations' bf16; the output comes back in (B, T, H, D). Its kernels are CUDA-only
and half precision, so anywhere else (CPU, fp32) the SDPA path runs. The math is the same; only the kernel
changes, which is why a run on a machine with FA3 matches the records' step times and numerics, not SDPA's.

Sites (each module receives the previous one's output first; see ``pgolf_core.model.sites``):

* ``qkv``: the projections' outputs before the heads split (value embeddings add to v, Canon B convolves);
* ``heads_out``: each head's output before the heads merge, with the values it attended (XSA, output gates);
* ``out``: the output projection's result.

Part ``rotary``: the RoPE tables and rotation (partial RoPE replaces it). While a ``DecodeCache`` is set
(``pgolf_core.model.decode``), the attention keeps pre-RoPE keys and values and attends from the new
positions only: self-generated calibration samples with it.
"""

from __future__ import annotations

from collections.abc import Callable

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


FLASH_ATTN_3_RUNS_ON: dict[str, tuple[torch.dtype, ...]] = {"cuda": (torch.bfloat16, torch.float16)}
"""Device type -> the dtypes FlashAttention-3 takes there: its kernels are CUDA (Hopper) and half precision.
Tensors elsewhere take the SDPA path. Tests add a CPU entry to drive the FA3 call through a stand-in."""


def flash_attn_3() -> Callable[..., Tensor] | None:
    """FlashAttention-3's ``flash_attn_func`` when ``flash_attn_interface`` imports, else ``None``.

    Looked up when an attention module is built (not at import), so the kernel follows the environment a model
    is built in; the records do the same lookup once at the top of their script."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


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
        self._flash_attn = flash_attn_3()

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
            y = self._attend(q, k, v)
        if self.heads_out is not None:
            y = self.heads_out(y, v.transpose(1, 2), x, aux)
        y = self.proj(y.contiguous().reshape(bsz, seqlen, dim))
        if self.out is not None:
            y = self.out(y, x, aux)
        return y

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of (B, H, T, D) queries over (B, Hkv, S, D) keys and values -> (B, T, H, D).

        With S > T (a KV cache) the queries are the last T positions: FA3's causal mask is aligned to the bottom
        right, so query i sees keys up to S - T + i. Which kernel runs is decided when the graph is traced (device,
        dtype and the module's lookup are static), so a compiled forward holds one call and no branch."""
        flash = self._flash_attn
        if flash is not None and q.dtype in FLASH_ATTN_3_RUNS_ON.get(q.device.type, ()) and k.dtype == q.dtype and v.dtype == q.dtype:
            # The records' call and layout; transposed views (unit stride in D, which is what FA3 needs).
            y = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return y[0] if isinstance(y, tuple) else y  # FA3 betas returned (out, softmax_lse)
        gqa = self.num_kv_heads != self.num_heads
        if k.size(2) == q.size(2):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True, enable_gqa=gqa)
        else:
            total, new = k.size(2), q.size(2)
            mask = None
            if new > 1:  # the new positions see the cache and, causally, each other
                mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=total - new)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)

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
        return self._attend(q, k, v)


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
