"""Partial RoPE with NTK-aware base rescaling.

Partial RoPE rotates only the first ``rope_dims`` of each head's dims (16 of 64 in the #315 record
``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``, PR #315); the rest attend without positional bias.
NTK scaling: for sequences longer than ``ntk_seq_len`` the base becomes ``base * (T/ntk_seq_len)^(r/(r-2))``.
The reference hard-codes ``ntk_seq_len = 1024`` while training at 2048, so the scaled base is what trains.
"""

from __future__ import annotations

import attrs

from pgolf_core.config.fields import non_negative, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class PartialRopeParams:
    rope_dims: int = param(16, help="rotated dims per head; 0 rotates all", env="ROPE_DIMS", validator=non_negative, toy="head_dim")
    ntk_seq_len: int = param(1024, help="rescale the base above this sequence length; 0 disables NTK", unit="tokens", validator=non_negative)


class PartialRope:
    def __init__(self, params: PartialRopeParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        head_dim = spec.model.model_dim // spec.model.num_heads
        dims = self.params.rope_dims
        if dims > head_dim or dims % 2:
            raise ValueError(f"rope_dims={dims} must be even and <= head dim {head_dim}")
        for i in layers:
            spec.claim("attention", i, "rope", (dims, self.params.ntk_seq_len), by=name)


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
