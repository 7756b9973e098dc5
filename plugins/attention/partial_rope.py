"""Partial RoPE with NTK-aware base rescaling: replaces the attention's ``rotary`` part.

Partial RoPE rotates only the first ``rope_dims`` of each head's dims (16 of 64 in the #315 record
``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``, PR #315); the rest attend without positional bias.
NTK scaling: for sequences longer than ``ntk_seq_len`` the base becomes ``base * (T/ntk_seq_len)^(r/(r-2))``.
The reference hard-codes ``ntk_seq_len = 1024`` while training at 2048, so the scaled base is what trains.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from pgolf_core.config.fields import non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.layers import Rotary, apply_rotary_emb
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class PartialRopeParams:
    rope_dims: int = param(16, help="rotated dims per head; 0 rotates all", env="ROPE_DIMS", validator=non_negative, toy="head_dim")
    ntk_seq_len: int = param(1024, help="rescale the base above this sequence length; 0 disables NTK", unit="tokens", validator=non_negative)


class PartialRotary(Rotary):
    """Tables over the first ``rope_dims`` dims; above ``ntk_seq_len`` tokens the NTK-rescaled base."""

    def __init__(self, dim: int, base: float, rope_dims: int = 0, ntk_seq_len: int = 0) -> None:
        self.rope_dims = rope_dims if rope_dims > 0 else dim
        super().__init__(self.rope_dims, base)
        self.ntk_seq_len = ntk_seq_len
        # Past ntk_seq_len the tables depend on the whole length: a KV cache is exact only up to here.
        self.decode_exact_limit = ntk_seq_len if ntk_seq_len > 0 else None

    def inv_freq_for(self, seq_len: int, device: torch.device) -> Tensor:
        rd = self.rope_dims
        if self.ntk_seq_len > 0 and seq_len > self.ntk_seq_len:
            new_base = self.base * ((seq_len / self.ntk_seq_len) ** (rd / (rd - 2)))
            return 1.0 / (new_base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
        return self.inv_freq.to(device)

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rd = cos.size(-1) * 2
        if rd < x.size(-1):
            x_rope, x_pass = x[..., :rd], x[..., rd:]
            half = rd // 2
            x1, x2 = x_rope[..., :half], x_rope[..., half:]
            return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, x_pass), dim=-1)
        return apply_rotary_emb(x, cos, sin)


class PartialRope:
    def __init__(self, params: PartialRopeParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        head_dim = spec.model.model_dim // spec.model.num_heads
        dims = self.params.rope_dims
        if dims > head_dim or dims % 2:
            raise ValueError(f"rope_dims={dims} must be even and <= head dim {head_dim}")
        p = self.params
        for i in layers:
            spec.replace("attention", i, "rotary", lambda host: PartialRotary(host.head_dim, host.rope_base, p.rope_dims, p.ntk_seq_len), by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="partial_rope",
            slot="modifier",
            params=PartialRopeParams,
            build=lambda params, ctx: PartialRope(params),
            summary="RoPE on the first rope_dims of each head, NTK-rescaled base above ntk_seq_len",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "partial_rope"\nrope_dims = 16\nntk_seq_len = 1024',
        )
    )
