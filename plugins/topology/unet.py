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
    def __init__(self, num_layers: int, dim: int) -> None:
        super().__init__()
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim, dtype=torch.float32))

    def forward(self, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor] | None = None) -> Tensor:
        aux = {} if aux is None else aux
        skips: list[Tensor] = []
        for i in range(self.num_encoder_layers):
            x = blocks[i](x, x0, aux)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(dtype=x.dtype)[None, None, :] * skips.pop()
            x = blocks[self.num_encoder_layers + i](x, x0, aux)
        return x


def build(params: UNetParams, ctx) -> UNetSkips:
    return UNetSkips(ctx.model.num_layers, ctx.model.model_dim)


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
