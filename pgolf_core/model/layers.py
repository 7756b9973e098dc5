"""Small building blocks shared by techniques (kept identical to the reference scripts' math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
)
"""Name fragments of small control tensors: kept fp32, optimised by Adam, exported unquantized (baseline)."""


def is_control_tensor(name: str, patterns: tuple[str, ...] = CONTROL_TENSOR_NAME_PATTERNS) -> bool:
    return any(p in name for p in patterns)


class RMSNorm(nn.Module):
    """Parameter-free RMS normalisation over the last dimension."""

    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=self.eps)


class CastedLinear(nn.Linear):
    """Linear layer whose fp32 weight is cast to the activation dtype at matmul time (bf16 compute on GPU)."""

    _zero_init: bool = False

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def zero_init(linear: nn.Linear) -> nn.Linear:
    """Mark a projection to be zeroed by the init slot (after every module consumed its RNG draws)."""
    linear._zero_init = True
    return linear


class Rotary(nn.Module):
    """RoPE cos/sin tables, cached per sequence length (the cache check is a guard under torch.compile)."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if (
            self._cos_cached is None
            or self._sin_cached is None
            or self._seq_len_cached != seq_len
            or self._cos_cached.device != device
        ):
            # Positions take inv_freq's dtype, as the reference does (bf16 after the model-wide cast on GPU).
            t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cos_cached = freqs.cos()[None, None, :, :]
            self._sin_cached = freqs.sin()[None, None, :, :]
            self._seq_len_cached = seq_len
        return self._cos_cached.to(dtype=dtype), self._sin_cached.to(dtype=dtype)


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
        for name, p in model.named_parameters():
            if (p.ndim < 2 or is_control_tensor(name)) and p.dtype != torch.float32:
                p.data = p.data.float()
