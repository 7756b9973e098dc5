"""Post-training int8 quantization: per-row for matrices, per-tensor for the rest (official baseline).

From the official baseline ``train_gpt.py``: each 2-D float tensor larger than ``keep_float_max_numel`` is
clipped at the ``clip_percentile`` quantile of |w| per row and rounded to int8 with an fp16 scale per row;
larger non-matrix tensors use one scale. Small float tensors pass through (control tensors in fp32, the
rest in fp16); non-float tensors pass through unchanged.
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
from pgolf.plugins.quantizer.common import dequantize_rows, nbytes, quantize_rows


@attrs.define(frozen=True, kw_only=True)
class Int8RowwiseParams:
    clip_percentile: float = param(99.99984, help="per-row |w| quantile used as the clip value", unit="%", validator=in_range(0.0, 100.0))
    keep_float_max_numel: int = param(65_536, help="float tensors up to this size are stored unquantized", validator=positive)


class Int8Rowwise:
    label = "int8"
    fmt = "int8_clean_per_row_v1"

    def __init__(self, params: Int8RowwiseParams) -> None:
        self.clip_q = params.clip_percentile / 100.0
        self.keep_float_max_numel = params.keep_float_max_numel

    def quantize_tensor(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_rows(t, self.clip_q, maxq=127, minq=-127)

    def quantize(self, state_dict: dict[str, Tensor], roles: Mapping[str, str]) -> tuple[dict, dict]:
        quantized, scales, dtypes, passthrough, orig_dtypes, qmeta = {}, {}, {}, {}, {}, {}
        stats = dict.fromkeys(("param_count", "num_tensors", "num_float_tensors", "num_nonfloat_tensors", "baseline_tensor_bytes", "payload_bytes"), 0)
        for name, tensor in state_dict.items():
            t = tensor.detach().to("cpu").contiguous()
            stats["param_count"] += int(t.numel())
            stats["num_tensors"] += 1
            stats["baseline_tensor_bytes"] += nbytes(t)
            if not t.is_floating_point():
                stats["num_nonfloat_tensors"] += 1
                passthrough[name] = t
                stats["payload_bytes"] += nbytes(t)
                continue
            if t.numel() <= self.keep_float_max_numel:
                if roles.get(name) == CONTROL:
                    kept = t.float().contiguous()
                elif t.dtype in (torch.float32, torch.bfloat16):
                    orig_dtypes[name] = str(t.dtype).removeprefix("torch.")
                    kept = t.to(dtype=torch.float16).contiguous()
                else:
                    kept = t
                passthrough[name] = kept
                stats["payload_bytes"] += nbytes(kept)
                continue
            stats["num_float_tensors"] += 1
            q, s = self.quantize_tensor(t)
            if s.ndim > 0:
                qmeta[name] = {"scheme": "per_row", "axis": 0}
            quantized[name], scales[name] = q, s
            dtypes[name] = str(t.dtype).removeprefix("torch.")
            stats["payload_bytes"] += nbytes(q) + nbytes(s)
        obj = {"__quant_format__": self.fmt, "quantized": quantized, "scales": scales, "dtypes": dtypes, "passthrough": passthrough}
        if qmeta:
            obj["qmeta"] = qmeta
        if orig_dtypes:
            obj["passthrough_orig_dtypes"] = orig_dtypes
        return obj, stats

    def dequantize(self, obj: dict) -> dict[str, Tensor]:
        return dequantize_rows(obj, self.fmt)


def build(params: Int8RowwiseParams, ctx) -> Int8Rowwise:
    return Int8Rowwise(params)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="int8_rowwise",
            slot="quantizer",
            params=Int8RowwiseParams,
            build=build,
            summary="percentile-clipped int8, per-row fp16 scales; small tensors kept in fp16/fp32 (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[quantizer]\nuse = "int8_rowwise"\nclip_percentile = 99.99984',
        )
    )
