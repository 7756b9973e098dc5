"""SDClip GPTQ: GPTQ whose clip is ``k`` standard deviations of each row, ``k`` and the bit width chosen per
tensor category (PR #1394, "SDClip"; per-category ``k`` as #1626 and later split it).

As the record's ``gptq_quantize_weight`` / ``gptq_mixed_quantize`` do it:

* the per-row scale is ``s = clamp_min(k · std(row) / clip_range, 1e-10)`` rounded to fp16 (``std`` unbiased,
  of the unquantized row), ``clip_range = 2^(bits-1) - 1``; values are ``clamp(round(w / s), ±clip_range)``, so
  the clip is ``k·std`` and there is no clip search;
* ``k`` and ``bits``: the token table (category ``embed``) ``embed_clip_sigmas`` (20) / ``embed_bits`` (8);
  the block matrices ``matrix_clip_sigmas`` (12.85) / ``matrix_bits`` (6), with ``mlp_clip_sigmas`` /
  ``attn_clip_sigmas`` overriding ``k`` for one category when > 0;
* GPTQ itself is #1019's (``pgolf.plugins.quantizer.gptq``: dead columns, ``H += damp·mean(diag H)·I``,
  act-order, upper Cholesky factor of ``H⁻¹``, blocks of 128 with error feedback);
* routing, per state_dict tensor: not float, or at most ``keep_float_max_numel`` (65,536) elements → fp16
  passthrough (control tensors included); larger → GPTQ with its Hessian (the record had one for every such
  tensor; pgolf rounds at the SDClip scale without error feedback when there is none, and logs it);
* Hessians: ``XᵀX`` of each linear's input over ``calib_batches`` forwards, divided by that count, no damping at
  collection. The record reads ``GPTQ_CALIBRATION_BATCHES`` (64) *training* batches from a fresh shuffled loader
  after training (``calibration = "train"``), inside the ``reserve_seconds`` (``GPTQ_RESERVE_SECONDS``, 12 s in
  #1394) taken off the training clock, which makes it compliant; ``"ar_selfgen"`` samples them as #1019 does. The tied embedding's Hessian (the final
  hidden state, the head's input) is collected when a technique taps it (``tied_embedding_gptq``). With several
  processes the record's ranks each collect from their own shards and all load rank 0's file, so rank 0's
  Hessians are broadcast and every rank computes rank 0's artifact.

``row_clip_multipliers`` is the hook by which a variant modulates ``k`` per row (``hessian_sdclip``, #1412).
Artifact: ``{"__quant_format__": "sdclip_gptq_v1", "w": {name | name.q, name.scale}, "m": {name: "passthrough"
| "passthrough_ctrl" | {"type": "int<bits>", "how": "gptq" | "round"}}, "dtypes": {...}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from pgolf_core.config.fields import in_range, non_negative, one_of, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import CONTROL
from pgolf_core.registry import Technique
from pgolf.plugins.quantizer.common import classify, dequantize_mixed, own_storage
from pgolf.plugins.quantizer.gptq import GPTQ, GPTQParams, gptq_blocks, gptq_prepare

FORMAT = "sdclip_gptq_v1"


@attrs.define(frozen=True, kw_only=True)
class SDClipParams:
    matrix_bits: int = param(6, help="bits of the block matrices (clip_range 2^(bits-1)-1)", unit="bits", env="MATRIX_BITS", validator=in_range(2, 8))
    embed_bits: int = param(8, help="bits of the token table (7 in #1626 and later)", unit="bits", env="EMBED_BITS", validator=in_range(2, 8))
    matrix_clip_sigmas: float = param(12.85, help="k of the block matrices: clip = k·std(row)", unit="row standard deviations", env="MATRIX_CLIP_SIGMAS", validator=positive)
    embed_clip_sigmas: float = param(20.0, help="k of the token table", unit="row standard deviations", env="EMBED_CLIP_SIGMAS", validator=positive)
    mlp_clip_sigmas: float = param(0.0, help="k of the MLP matrices; 0 = matrix_clip_sigmas", unit="row standard deviations", env="MLP_CLIP_SIGMAS", validator=non_negative)
    attn_clip_sigmas: float = param(0.0, help="k of the attention matrices; 0 = matrix_clip_sigmas", unit="row standard deviations", env="ATTN_CLIP_SIGMAS", validator=non_negative)
    keep_float_max_numel: int = param(65_536, help="float tensors up to this size are stored as fp16", unit="elements", validator=positive)
    block_size: int = param(128, help="GPTQ lazy-update block width", unit="columns", validator=positive)
    damp: float = param(0.01, help="GPTQ damping: H += damp * mean(diag H) * I", validator=non_negative)
    calibration: str = param(
        "train",
        help="'train' (training batches from a fresh loader, as #1394; compliant only inside the training clock's reserve), 'ar_selfgen' (self-generated, #1019) or 'none'",
        validator=one_of("train", "ar_selfgen", "none"),
    )
    calib_batches: int = param(64, help="calibration forwards: training batches ('train') or self-generated sequences ('ar_selfgen')", unit="batches", env="GPTQ_CALIBRATION_BATCHES", validator=positive)
    reserve_seconds: float = param(0.0, help="seconds taken off the training wallclock for calibration on training data, which then counts as training (#1394: 12); no effect without a cap", unit="seconds", env="GPTQ_RESERVE_SECONDS", validator=non_negative)


def sdclip_scales(w: Tensor, k: float | Tensor, clip_range: int) -> Tensor:
    """Per-row fp16 scales ``clamp_min(k · std(row) / clip_range, 1e-10)`` (``k`` a number or a per-row vector)."""
    w32 = w.float()
    return (k * w32.std(dim=1) / clip_range).clamp_min(1e-10).to(torch.float16)


def round_at(w: Tensor, s: Tensor, clip_range: int) -> Tensor:
    """Plain rounding at per-row scales: ``clamp(round(w / s), ±clip_range)`` as int8."""
    return torch.clamp(torch.round(w.float() / s.float()[:, None]), -clip_range, clip_range).to(torch.int8)


def sdclip_gptq(w: Tensor, H: Tensor, k: float, clip_range: int, block_size: int = 128, damp: float = 0.01, multipliers: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GPTQ of one matrix at SDClip scales (``k`` times ``multipliers`` per row when given): (int8 Q in the
    original column order, fp16 scales)."""
    W, U, inv_perm = gptq_prepare(w, H, damp)
    kk = k if multipliers is None else k * multipliers
    s = sdclip_scales(w, kk, clip_range)
    Q = gptq_blocks(W, U, s.float(), clip_range, block_size)
    return Q.to(torch.int8)[:, inv_perm].contiguous(), s


def broadcast_from_rank0(hessians: dict[str, Tensor], device) -> dict[str, Tensor]:
    """Rank 0's Hessians on every rank. In the record each rank collects Hessians from its own shards and
    quantizes with them, and every rank then loads the file rank 0 wrote: the artifact is rank 0's. Broadcasting
    them makes every rank compute that same artifact (names in sorted order; a no-op in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return hessians
    out = {}
    for name in sorted(hessians):
        t = hessians[name].to(device).contiguous()
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out


class SDClipGPTQ:
    label = "int6"  # the records name the artifact final_model.int6.ptz
    fmt = FORMAT

    def __init__(self, params: SDClipParams) -> None:
        self.params = params
        self.hessians: dict[str, Tensor] = {}
        calib = {"train": "train", "ar_selfgen": "ar_selfgen", "none": "none"}[params.calibration]
        self._inner = GPTQ(GPTQParams(calibration=calib, calib_train_batches=params.calib_batches, calib_seqs=params.calib_batches, collect_damp=0.0, hessian_precision="fp32", reserve_seconds=params.reserve_seconds))
        self._log = None

    @property
    def train_time_reserve_s(self) -> float:
        """Seconds the training loop leaves for this calibration (``pgolf_core.contracts.ReservesTrainTime``)."""
        return self.params.reserve_seconds

    @property
    def compliance(self):
        return self._inner.compliance

    def calibrate(self, ctx) -> None:
        self._log = ctx.log
        self._inner.calibrate(ctx)
        self.hessians = broadcast_from_rank0(self._inner.hessians, ctx.runtime.device)

    def category_k_bits(self, name: str) -> tuple[float, int]:
        p = self.params
        cat = classify(name)
        if cat == "embed":
            return p.embed_clip_sigmas, p.embed_bits
        k = {"mlp": p.mlp_clip_sigmas, "attn": p.attn_clip_sigmas}.get(cat, 0.0) or p.matrix_clip_sigmas
        return k, p.matrix_bits

    def row_clip_multipliers(self, name: str, w: Tensor, H: Tensor) -> Tensor | None:
        """Per-row factors on ``k`` (None: plain SDClip). Variants override it."""
        return None

    def quantize(self, state_dict: dict[str, Tensor], roles: Mapping[str, str]) -> tuple[dict, dict]:
        p = self.params
        w: dict[str, Tensor] = {}
        m: dict[str, Any] = {}
        dtypes: dict[str, str] = {}
        stats = dict.fromkeys(("payload_bytes", "num_gptq", "num_round", "num_passthrough"), 0)
        for name, tensor in state_dict.items():
            t = tensor.detach().to("cpu").contiguous()
            if t.is_floating_point() and t.dtype != torch.float32:
                dtypes[name] = str(t.dtype).removeprefix("torch.")
            if not t.is_floating_point() or t.numel() <= p.keep_float_max_numel:
                w[name] = own_storage(t.to(torch.float16) if t.is_floating_point() else t)
                m[name] = "passthrough"
                stats["num_passthrough"] += 1
                continue
            if roles.get(name) == CONTROL or t.ndim != 2:
                w[name] = own_storage(t.float())
                m[name] = "passthrough_ctrl"
                stats["num_passthrough"] += 1
                continue
            k, bits = self.category_k_bits(name)
            clip_range = 2 ** (bits - 1) - 1
            H = self.hessians.get(name)
            if H is not None:
                q, s = sdclip_gptq(t, H, k, clip_range, p.block_size, p.damp, self.row_clip_multipliers(name, t, H))
                how = "gptq"
            else:
                s = sdclip_scales(t, k, clip_range)
                q, how = round_at(t, s, clip_range), "round"
                if self._log is not None:
                    self._log(f"sdclip:{name} has no Hessian: rounded at k={k} without error feedback")
            w[name + ".q"], w[name + ".scale"] = q, s
            m[name] = {"type": f"int{bits}", "how": how}
            stats[f"num_{how}"] += 1
        stats["payload_bytes"] = sum(int(v.numel()) * v.element_size() for v in w.values())
        return {"__quant_format__": self.fmt, "w": w, "m": m, "dtypes": dtypes}, stats

    def dequantize(self, obj: dict) -> dict[str, Tensor]:
        return dequantize_mixed(obj, self.fmt)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="sdclip",
            slot="quantizer",
            params=SDClipParams,
            build=lambda params, ctx: SDClipGPTQ(params),
            summary="GPTQ with clip = k·std(row), k and bits per category (matrices int6 k 12.85, embedding int8 k 20), Hessians from training batches (PR #1394)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2",
            example='[quantizer]\nuse = "sdclip"\nmatrix_clip_sigmas = 12.85\nembed_clip_sigmas = 20.0\nembed_bits = 8',
        )
    )
