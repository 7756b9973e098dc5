"""Mixed int6/int8 export of PR #400 (``quantize_state_dict_mixed_int6``): the baseline's percentile-clipped
per-row quantizer with a bit width per tensor category.

* non-float tensors pass through; float tensors with ``numel <= keep_float_max_numel`` pass through, control
  tensors in fp32, the rest in fp16 (restored to their dtype);
* larger tensors: category ``tok_emb``/``lm_head`` → embed, ``.mlp.`` → mlp, ``.attn.`` → attn, else other;
  ``bits = 6`` for categories in ``int6_categories``, else 8. Range ``[-2^(b-1), 2^(b-1)-1]`` (int8 may use
  -128, unlike the baseline), clip at the ``clip_percentile`` quantile of |w| per row,
  ``scale = max(clip/maxq, 1/maxq)``, stored fp16.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
from torch import Tensor

from pgolf_core.config.fields import in_range, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import CONTROL
from pgolf_core.registry import Technique
from pgolf.plugins.quantizer.common import categories, classify, dequantize_rows, quantize_rows


@attrs.define(frozen=True, kw_only=True)
class Int6PercentileParams:
    int6_categories: str = param("mlp,attn", help="comma list of categories quantized to int6 (embed, mlp, attn, other)", env="INT6_CATEGORIES")
    clip_percentile: float = param(99.99984, help="per-row |w| quantile used as the clip value", unit="%", validator=in_range(0.0, 100.0))
    keep_float_max_numel: int = param(65_536, help="float tensors up to this size are stored unquantized", validator=positive)


def quantize_bits(t: Tensor, bits: int, clip_q: float) -> tuple[Tensor, Tensor]:
    return quantize_rows(t, clip_q, maxq=(1 << (bits - 1)) - 1, minq=-(1 << (bits - 1)))


class Int6Percentile:
    label = "int6"
    fmt = "mixed_int6_int8_per_row_v1"

    def __init__(self, params: Int6PercentileParams) -> None:
        self.categories = categories(params.int6_categories)
        self.clip_q = params.clip_percentile / 100.0
        self.keep_float_max_numel = params.keep_float_max_numel

    def quantize(self, state_dict: dict[str, Tensor], roles: Mapping[str, str]) -> tuple[dict, dict]:
        quantized, scales, dtypes, passthrough, orig_dtypes, qmeta = {}, {}, {}, {}, {}, {}
        stats = {"payload_bytes": 0, "num_int6": 0, "num_int8": 0}
        for name, tensor in state_dict.items():
            t = tensor.detach().to("cpu").contiguous()
            if not t.is_floating_point() or t.numel() <= self.keep_float_max_numel:
                control = roles.get(name) == CONTROL
                if t.is_floating_point() and not control and t.dtype in (torch.float32, torch.bfloat16):
                    orig_dtypes[name] = str(t.dtype).removeprefix("torch.")
                    t = t.to(torch.float16).contiguous()
                elif t.is_floating_point() and control:
                    t = t.float().contiguous()
                passthrough[name] = t
                stats["payload_bytes"] += t.numel() * t.element_size()
                continue
            bits = 6 if classify(name, proj_as_attn=False) in self.categories else 8
            q, s = quantize_bits(t, bits, self.clip_q)
            qmeta[name] = {"scheme": "per_row", "axis": 0, "bits": bits} if s.ndim > 0 else {"scheme": "per_tensor", "bits": bits}
            quantized[name], scales[name] = q, s
            dtypes[name] = str(t.dtype).removeprefix("torch.")
            stats["num_int6" if bits == 6 else "num_int8"] += 1
            stats["payload_bytes"] += q.numel() * q.element_size() + s.numel() * s.element_size()
        obj = {"__quant_format__": self.fmt, "quantized": quantized, "scales": scales, "dtypes": dtypes, "passthrough": passthrough, "qmeta": qmeta}
        if orig_dtypes:
            obj["passthrough_orig_dtypes"] = orig_dtypes
        return obj, stats

    def dequantize(self, obj: dict) -> dict[str, Tensor]:
        return dequantize_rows(obj, self.fmt)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="int6_percentile",
            slot="quantizer",
            params=Int6PercentileParams,
            build=lambda params, ctx: Int6Percentile(params),
            summary="percentile-clipped per-row int6 (mlp/attn) / int8, fp32 control tensors, fp16 small tensors (PR #400)",
            source="https://github.com/openai/parameter-golf/pull/400",
            example='[quantizer]\nuse = "int6_percentile"\nint6_categories = "mlp,attn"',
        )
    )
