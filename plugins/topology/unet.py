"""U-Net skips over the block stack: the first half stores outputs, the second half adds them back in reverse.

From the official baseline ``train_gpt.py``: ``num_layers // 2`` encoder blocks; before each decoder block
``x += skip_weights[i] * skips.pop()``; skip weights are ones, one vector per skip.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class UNetParams:
    """No parameters: encoder/decoder split is num_layers // 2."""


class UNetSkips(nn.Module):
    def __init__(self, num_layers: int, dim: int, recurrence=None, lanes=None) -> None:
        super().__init__()
        # Two lanes (option from the two_lane_parallel modifier, PR #1289): the decoder layers listed run
        # ``forward_lanes``; the lanes are merged by one learned scalar after the last block.
        self.lane_layers: tuple[int, ...] = tuple(lanes.layers) if lanes is not None else ()
        if recurrence is not None and set(recurrence.layers) & set(self.lane_layers) and not recurrence.encoder_only:
            both = sorted(set(recurrence.layers) & set(self.lane_layers))
            raise ValueError(f"depth_recurrence cannot repeat two-lane layers {both}; drop them from one modifier's layers")
        # Depth recurrence (option from the depth_recurrence modifier): its blend vectors come first, as the
        # reference created them first; a plain Python flag switches it on (one recompile when compiled).
        self.recur_layers: tuple[int, ...] = tuple(recurrence.layers) if recurrence is not None else ()
        self.recur_encoder_only = bool(recurrence.encoder_only) if recurrence is not None else True
        self.recur_active = False
        self.recur_scales = nn.ParameterList(
            [nn.Parameter(torch.full((dim,), float(recurrence.scale_init), dtype=torch.float32)) for _ in self.recur_layers]
        )
        if recurrence is not None and not recurrence.train_scales:
            for s in self.recur_scales:
                s._pgolf_untrained = True  # in no optimizer group (PR #1392)
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim, dtype=torch.float32))
        if lanes is not None:
            self.lane_merge = nn.Parameter(torch.tensor(float(lanes.merge_init), dtype=torch.float32))

    def forward(self, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor] | None = None) -> Tensor:
        aux = {} if aux is None else aux
        skips: list[Tensor] = []
        for i in range(self.num_encoder_layers):
            x = blocks[i](x, x0, aux)
            skips.append(x)
            if self.recur_active and i in self.recur_layers:
                x = self._repeat(blocks, i, x, x0, aux)
        if self.lane_layers:
            return self._decoder_two_lanes(x, x0, blocks, aux, skips)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(dtype=x.dtype)[None, None, :] * skips.pop()
            bi = self.num_encoder_layers + i
            x = blocks[bi](x, x0, aux)
            if self.recur_active and not self.recur_encoder_only and bi in self.recur_layers:
                x = self._repeat(blocks, bi, x, x0, aux)
        return x

    def _decoder_two_lanes(self, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor], skips: list[Tensor]) -> Tensor:
        x_a, x_m = x, x
        for i in range(self.num_decoder_layers):
            bi = self.num_encoder_layers + i
            lanes = bi in self.lane_layers
            if skips:
                skip = self.skip_weights[i].to(dtype=x_a.dtype)[None, None, :] * skips.pop()
                x_a = x_a + skip
                if lanes:
                    x_m = x_m + skip
            if lanes:
                x_a, x_m = blocks[bi].forward_lanes(x_a, x_m, x0, aux)
            else:
                x_a = blocks[bi](x_a, x0, aux)
                if self.recur_active and not self.recur_encoder_only and bi in self.recur_layers:
                    x_a = self._repeat(blocks, bi, x_a, x0, aux)
                x_m = x_a
        m = self.lane_merge.to(dtype=x_a.dtype)
        return m * x_a + (1.0 - m) * x_m

    def _repeat(self, blocks: nn.ModuleList, i: int, x: Tensor, x0: Tensor, aux: dict[str, Tensor]) -> Tensor:
        scale = self.recur_scales[self.recur_layers.index(i)]
        out = blocks[i](x, x0, aux)
        return x + scale.to(dtype=x.dtype)[None, None, :] * (out - x)


def build(params: UNetParams, ctx) -> UNetSkips:
    return UNetSkips(ctx.model.num_layers, ctx.model.model_dim, ctx.option("recurrence"), ctx.option("lanes"))


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="unet",
            slot="topology",
            params=UNetParams,
            build=build,
            summary="U-Net skip connections between mirrored encoder/decoder blocks (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[topology]\nuse = "unet"',
        )
    )
