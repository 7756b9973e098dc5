"""Mixed int6/int8 export of the #315 record and PR #450 (``mixed_quantize_int6``).

Per state-dict tensor, in order:

* non-float, or ``numel <= keep_float_max_numel``: stored fp16 if float (control tensors included), restored
  to the model's dtype;
* larger control tensors: kept fp32;
* category (``tok_emb``/``lm_head`` → embed, ``.mlp.`` → mlp, ``.attn.`` or ``.proj.`` → attn, else other)
  in ``int6_categories``: per-row abs-max int6, ``scale = fp16(max(row_max/31, 1/31))``, values
  ``clamp(round(W/scale), -32, 31)``;
* category in ``int5_categories`` (none in the shipped stacks): per-row abs-max int5, range [-16, 15],
  ``scale = fp16(max(row_max/15, 1e-12))`` (the int5 MLP export of the ``2026-03-20_10L_Int5MLP_MuonWD04_SWA50``
  record); it takes precedence over int6;
* anything else: the baseline's percentile-clipped int8 per row (fp16 scales).

Serialized as ``{"w": tensors, "m": meta}`` like the reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
from torch import Tensor

from pgolf_core.config.fields import param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import CONTROL
from pgolf_core.registry import Technique
from pgolf.plugins.quantizer.common import categories, classify, dequantize, quantize_absmax_rows, quantize_rows


@attrs.define(frozen=True, kw_only=True)
class Int6AbsmaxParams:
    int6_categories: str = param("mlp,attn", help="comma list of categories quantized to int6 (embed, mlp, attn, other)", env="INT6_CATEGORIES")
    int5_categories: str = param("", help="comma list of categories quantized to int5 (abs-max, [-16, 15])")
    keep_float_max_numel: int = param(65_536, help="float tensors up to this size are stored fp16", validator=positive)


def quantize_int5_per_row(t: Tensor) -> tuple[Tensor, Tensor]:
    """Abs-max int5 per row, ``[-16, 15]``, ``scale = fp16(max(row_max/15, 1e-12))`` (the int5 MLP export of the
    ``2026-03-20_10L_Int5MLP_MuonWD04_SWA50`` record)."""
    t32 = t.float()
    row_max = t32.abs().amax(dim=1) if t32.ndim == 2 else t32.abs().max()
    scale = (row_max / 15.0).clamp_min(1e-12).to(torch.float16)
    s = scale.float()[:, None] if t32.ndim == 2 else scale.float()
    return torch.clamp(torch.round(t32 / s), -16, 15).to(torch.int8), scale


class Int6Absmax:
    label = "int6"

    def __init__(self, params: Int6AbsmaxParams) -> None:
        self.categories = categories(params.int6_categories)
        self.int5_categories = categories(params.int5_categories)
        self.keep_float_max_numel = params.keep_float_max_numel
        self.int8_clip_q = 99.99984 / 100.0  # the baseline's percentile, as the reference's int8 fallback
        self.template: dict[str, tuple[torch.dtype, torch.Size]] = {}

    def quantize(self, state_dict: dict[str, Tensor], roles: Mapping[str, str]) -> tuple[dict, dict]:
        result: dict[str, Tensor] = {}
        meta: dict[str, object] = {}
        stats = {"payload_bytes": 0, "num_int6": 0, "num_int8": 0, "num_passthrough": 0}
        self.template = {k: (v.dtype, v.shape) for k, v in state_dict.items()}
        for name, tensor in state_dict.items():
            t = tensor.detach().cpu().contiguous()
            if not t.is_floating_point() or t.numel() <= self.keep_float_max_numel:
                result[name] = t.to(torch.float16) if t.is_floating_point() else t
                meta[name] = "passthrough"
                stats["num_passthrough"] += 1
            elif roles.get(name) == CONTROL:
                result[name] = t.float()
                meta[name] = "passthrough_ctrl"
                stats["num_passthrough"] += 1
            else:
                if classify(name) in self.int5_categories and t.ndim >= 1:
                    q, s = quantize_int5_per_row(t)
                    meta[name] = {"type": "int5"}
                    stats["num_int5"] = stats.get("num_int5", 0) + 1
                elif classify(name) in self.categories and t.ndim >= 1:
                    q, s = quantize_absmax_rows(t, 31)
                    meta[name] = {"type": "int6"}
                    stats["num_int6"] += 1
                else:
                    q, s = quantize_rows(t, self.int8_clip_q)
                    meta[name] = {"type": "int8"}
                    stats["num_int8"] += 1
                result[name + ".q"], result[name + ".scale"] = q, s
        stats["payload_bytes"] = sum(int(v.numel()) * v.element_size() for v in result.values())
        return {"w": result, "m": meta}, stats

    def dequantize(self, obj: dict) -> dict[str, Tensor]:
        result, meta = obj["w"], obj["m"]
        out: dict[str, Tensor] = {}
        for name, info in meta.items():
            orig_dtype = self.template[name][0] if name in self.template else None
            if info in ("passthrough", "passthrough_ctrl"):
                t = result[name]
                if t.dtype == torch.float16 and orig_dtype in (torch.float32, torch.bfloat16):
                    t = t.to(orig_dtype)
                out[name] = t
                continue
            out[name] = dequantize(result[name + ".q"], result[name + ".scale"], orig_dtype or torch.float32)
        return out


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="int6_absmax",
            slot="quantizer",
            params=Int6AbsmaxParams,
            build=lambda params, ctx: Int6Absmax(params),
            summary="abs-max int6 per row for mlp/attn, int8 elsewhere, fp16 small tensors (#315 record, PR #450)",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[quantizer]\nuse = "int6_absmax"\nint6_categories = "mlp,attn"',
        )
    )
