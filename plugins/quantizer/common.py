"""Quantization math the quantizers share (not a technique of its own): tensor categories, per-row rounding
at a clip, and the per-row artifact layout of the baseline line.

Kept in one module so that each formula exists once; a quantizer's export bundles this file with it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def classify(name: str, proj_as_attn: bool = True) -> str:
    """Tensor category of the references' ``_classify_param``: ``tok_emb``/``lm_head`` → embed, ``.mlp.`` → mlp,
    ``.attn.`` → attn, else other. ``proj_as_attn`` (the #315 record, #1019 and later): a ``.proj.`` outside an
    MLP counts as attention too; PR #400's export did not have that rule."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name or (proj_as_attn and ".proj." in name):
        return "attn"
    return "other"


def categories(value: str) -> set[str]:
    """``"mlp,attn"`` → {"mlp", "attn"}."""
    return {c.strip() for c in value.split(",") if c.strip()}


def quantize_rows(t: Tensor, clip_q: float, maxq: int = 127, minq: int = -127) -> tuple[Tensor, Tensor]:
    """Percentile-clipped symmetric quantization: per row (fp16 scales ``max(clip/maxq, 1/maxq)``) for matrices,
    one fp32 scale otherwise. The baseline uses ``[-127, 127]``; PR #400's per-category export uses
    ``[-2^(b-1), 2^(b-1)-1]``; GPTQ's int8 tensors the baseline's."""
    t32 = t.float()
    if t32.ndim == 2:
        clip_abs = torch.quantile(t32.abs(), clip_q, dim=1) if t32.numel() else torch.empty((t32.shape[0],), dtype=torch.float32)
        clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
        scale = (clip_abs / float(maxq)).clamp_min(1.0 / float(maxq))
        q = torch.clamp(torch.round(clipped / scale[:, None]), minq, maxq).to(torch.int8).contiguous()
        return q, scale.to(dtype=torch.float16).contiguous()
    clip_abs = float(torch.quantile(t32.abs().flatten(), clip_q).item()) if t32.numel() else 0.0
    scale = torch.tensor(clip_abs / float(maxq) if clip_abs > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip_abs, clip_abs) / scale), minq, maxq).to(torch.int8).contiguous()
    return q, scale


def quantize_absmax_rows(t: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Abs-max rounding per row to ``[-(levels+1), levels]`` with fp16 scales ``max(row_max/levels, 1/levels)``
    (the #315 record's int6: ``levels = 31``); one fp16 scale for other shapes."""
    t32 = t.float()
    if t32.ndim == 2:
        row_max = t32.abs().amax(dim=1)
        scale = (row_max / float(levels)).clamp_min(1.0 / float(levels)).to(torch.float16)
        q = torch.clamp(torch.round(t32 / scale.float()[:, None]), -(levels + 1), levels).to(torch.int8)
        return q, scale
    amax = t32.abs().max().item()
    scale = torch.tensor(amax / float(levels) if amax > 0 else 1.0, dtype=torch.float16)
    q = torch.clamp(torch.round(t32 / scale.float()), -(levels + 1), levels).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """``q * s`` per row (a vector of scales) or per tensor (a scalar), cast to ``dtype``."""
    if s.ndim > 0:
        return (q.float() * s.float().view(q.shape[0], *([1] * (q.ndim - 1)))).to(dtype=dtype).contiguous()
    return (q.float() * float(s.item())).to(dtype=dtype).contiguous()


def dequantize_mixed(obj: dict, fmt: str) -> dict[str, Tensor]:
    """Inverse of the ``w/m/dtypes`` layout of the GPTQ line (#1019 on; SDClip #1394): per tensor either a
    stored float (``m[name]`` a string) or ``name.q`` and ``name.scale``; refuses another format."""
    if not isinstance(obj, dict) or obj.get("__quant_format__") != fmt:
        found = obj.get("__quant_format__") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"artifact format {found!r} is not {fmt!r}")
    w, out = obj["w"], {}
    for name, info in obj["m"].items():
        dtype = getattr(torch, obj["dtypes"].get(name, "float32"))
        if isinstance(info, str):
            t = w[name]
            out[name] = t.to(dtype) if t.is_floating_point() else t
            continue
        out[name] = dequantize(w[name + ".q"], w[name + ".scale"], dtype)
    return out


def dequantize_rows(obj: dict, fmt: str) -> dict[str, Tensor]:
    """Inverse of the ``quantized/scales/dtypes/passthrough`` layout shared by the baseline and PR #400;
    refuses an artifact written in another format (``__quant_format__``)."""
    if obj.get("__quant_format__") != fmt:
        raise ValueError(f"artifact format {obj.get('__quant_format__')!r} is not {fmt!r}")
    out: dict[str, Tensor] = {}
    orig_dtypes = obj.get("passthrough_orig_dtypes", {})
    for name, q in obj["quantized"].items():
        out[name] = dequantize(q, obj["scales"][name], getattr(torch, obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        restored = t.detach().to("cpu").contiguous()
        if isinstance(orig_dtypes.get(name), str):
            restored = restored.to(dtype=getattr(torch, orig_dtypes[name])).contiguous()
        out[name] = restored
    return out


def nbytes(t: Tensor) -> int:
    return int(t.numel()) * int(t.element_size())


def own_storage(t: Tensor) -> Tensor:
    """Serialize only what the tensor holds (a view would drag its whole storage into the artifact)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
