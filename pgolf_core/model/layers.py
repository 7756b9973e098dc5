"""Small building blocks shared by techniques (kept identical to the reference scripts' math)."""

from __future__ import annotations

import contextlib
from typing import Iterator

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
    "smear",
    "bigram.scale",
    "xsa_gate",
    "ve_layer_scales",
    "ve_shared.scale",
)
"""Name fragments of small control tensors: kept fp32, optimised by Adam, exported unquantized.

The baseline's list plus ``smear`` (SmearGate, added with it in the #315 line of records)."""


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
    """Linear layer whose fp32 weight is cast to the activation dtype at matmul time (bf16 compute on GPU).

    Optionally carries straight-through fake quantization (``enable_fake_quant``): in training mode the
    forward sees the row-wise abs-max quantized weight while gradients flow to the fp32 weight. Whether it
    is active is a buffer (0 or 1), not a Python flag, so a compiled graph reads the switch at run time and
    turning it on needs no recompile.
    """

    _zero_init: bool = False
    fake_quant_bits: int = 0
    _defer_init: bool = False  # set by ``deferred_init()``: construct without drawing from the RNG

    def reset_parameters(self) -> None:
        if CastedLinear._defer_init:
            return  # weights stay as allocated (torch.empty); the init slot writes every one of them
        super().reset_parameters()

    def enable_fake_quant(self, bits: int) -> None:
        self.fake_quant_bits = bits
        self.register_buffer("fake_quant_on", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.fake_quant_bits and self.training:
            qmax = 2 ** (self.fake_quant_bits - 1) - 1
            with torch.no_grad():
                w32 = self.weight.float()
                scale = (w32.abs().amax(dim=1) / qmax).clamp_min(1.0 / qmax)
                w_q = (torch.clamp(torch.round(w32 / scale[:, None]), -qmax - 1, qmax) * scale[:, None]).to(x.dtype)
            w = w + self.fake_quant_on.to(x.dtype) * (w_q - w).detach()
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
    """RoPE cos/sin tables, cached per sequence length (the cache check is a guard under torch.compile).

    ``rope_dims`` < head dim rotates only the first ``rope_dims`` dims (partial RoPE). ``ntk_seq_len`` > 0
    rescales the base for sequences longer than it, ``base * (T / ntk_seq_len) ** (r / (r - 2))`` (NTK-aware
    RoPE, as in the #315 line of records, where it is hard-coded to 1024).
    """

    def __init__(self, dim: int, base: float = 10000.0, rope_dims: int = 0, ntk_seq_len: int = 0) -> None:
        super().__init__()
        self.rope_dims = rope_dims if rope_dims > 0 else dim
        self.base = base
        self.ntk_seq_len = ntk_seq_len
        # Past ntk_seq_len the tables depend on the whole length: a KV cache is exact only up to here.
        self.decode_exact_limit = ntk_seq_len if ntk_seq_len > 0 else None
        rd = self.rope_dims
        inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
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
            rd = self.rope_dims
            if self.ntk_seq_len > 0 and seq_len > self.ntk_seq_len:
                new_base = self.base * ((seq_len / self.ntk_seq_len) ** (rd / (rd - 2)))
                inv_freq = 1.0 / (new_base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
            else:
                inv_freq = self.inv_freq.to(device)
            # Positions take inv_freq's dtype, as the reference does (bf16 after the model-wide cast on GPU).
            t = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
            freqs = torch.outer(t, inv_freq)
            self._cos_cached = freqs.cos()[None, None, :, :]
            self._sin_cached = freqs.sin()[None, None, :, :]
            self._seq_len_cached = seq_len
        return self._cos_cached.to(dtype=dtype), self._sin_cached.to(dtype=dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rd = cos.size(-1) * 2
    if rd < x.size(-1):
        x_rope, x_pass = x[..., :rd], x[..., rd:]
        half = rd // 2
        x1, x2 = x_rope[..., :half], x_rope[..., half:]
        return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, x_pass), dim=-1)
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
