"""Small building blocks of the official baseline ``train_gpt.py``, shared by techniques (same math).

What a technique adds to them (partial RoPE, fake quantization, ...) lives in that technique's module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .roles import is_control


class RMSNorm(nn.Module):
    """Parameter-free RMS normalisation over the last dimension."""

    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=self.eps)


class CastedLinear(nn.Linear):
    """Linear layer whose fp32 weight is cast to the activation dtype at matmul time (bf16 compute on GPU).

    ``weight_transform`` is the layer's one site: a module another technique may set (after the model is
    built, before it is compiled) that maps ``(fp32 weight, weight in the activation dtype)`` to the weight
    the matmul uses; late QAT's straight-through fake quantization is one. ``None`` adds nothing.
    """

    SITES = {"weight_transform": "(weight fp32, w in the activation dtype) -> w: the weight the matmul uses"}
    _zero_init: bool = False
    _defer_init: bool = False  # set by ``deferred_init()``: construct without drawing from the RNG

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_transform: nn.Module | None = None

    def reset_parameters(self) -> None:
        if CastedLinear._defer_init:
            return  # weights stay as allocated (torch.empty); the init slot writes every one of them
        super().reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.weight_transform is not None:
            w = self.weight_transform(self.weight, w)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)


@contextlib.contextmanager
def deferred_init(enabled: bool = True) -> Iterator[None]:
    """Build ``CastedLinear`` layers without their constructor's kaiming draw.

    PR #399's parameter banks (kept by #549, #1019, #1392) allocate the block matrices with ``torch.empty``,
    so the only RNG draws for them are the init's orthogonal ones. Building per-layer modules inside this
    context consumes the RNG exactly as the banks did; the init slot must then write every such weight.
    """
    previous = CastedLinear._defer_init
    CastedLinear._defer_init = enabled
    try:
        yield
    finally:
        CastedLinear._defer_init = previous


def zero_init(linear: nn.Linear) -> nn.Linear:
    """Mark a projection to be zeroed by the init slot (after every module consumed its RNG draws)."""
    linear._zero_init = True
    return linear


class Rotary(nn.Module):
    """The baseline's RoPE: cos/sin tables over the whole head dim, cached per sequence length (the cache
    check is a guard under torch.compile).

    The attention calls it as ``rotary(seq_len, device, dtype) -> (cos, sin)`` and ``rotary.apply(x, cos, sin)``;
    a technique that replaces this part (partial RoPE) provides both, or overrides ``inv_freq_for``. ``decode_exact_limit``: the longest prefix a KV cache
    reproduces exactly (None: any length; see ``pgolf_core.model.decode``).
    """

    decode_exact_limit: int | None = None

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None

    def inv_freq_for(self, seq_len: int, device: torch.device) -> Tensor:
        return self.inv_freq.to(device)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if (
            self._cos_cached is None
            or self._sin_cached is None
            or self._seq_len_cached != seq_len
            or self._cos_cached.device != device
        ):
            if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
                self._build(seq_len, device)
            else:
                with torch.inference_mode(False):  # a table built while sampling must still serve training
                    self._build(seq_len, device)
        return self._cos_cached.to(dtype=dtype), self._sin_cached.to(dtype=dtype)

    def _build(self, seq_len: int, device: torch.device) -> None:
        inv_freq = self.inv_freq_for(seq_len, device)
        # Positions take inv_freq's dtype, as the reference does (bf16 after the model-wide cast on GPU).
        t = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
        freqs = torch.outer(t, inv_freq)
        self._cos_cached = freqs.cos()[None, None, :, :]
        self._sin_cached = freqs.sin()[None, None, :, :]
        self._seq_len_cached = seq_len

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary_emb(x, cos, sin)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


def cast_for_device(model: nn.Module, bf16: bool) -> None:
    """The reference dtype policy: body in bf16, CastedLinear weights and control/low-dim params in fp32."""
    if not bf16:
        return
    model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    with torch.no_grad():
        for p in model.parameters():
            if (p.ndim < 2 or is_control(p)) and p.dtype != torch.float32:
                p.data = p.data.float()
