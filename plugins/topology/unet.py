"""U-Net skips over the block stack: the first half stores outputs, the second half adds them back in reverse.

From the official baseline ``train_gpt.py``: ``num_layers // 2`` encoder blocks; before each decoder block
``x += skip_weights[i] * skips.pop()``; skip weights are ones, one vector per skip.

Parts:

* ``schedule``: which physical block runs at each position, and how (depth recurrence owns it). Default:
  each block once, ``encoder = 0..L/2-1``, ``decoder = L/2..L-1``. A schedule provides ``encoder()`` and
  ``decoder()`` (block indices per position), ``num_skips`` and ``run(block, x, x0, blocks, aux) -> (x,
  skip)``: the output and, in the encoder, the tensor stored as the skip. It is created first, before the
  skip weights (PR #1392 created its recurrence scales first).
* ``decoder``: the decoder's data flow, given the encoder's output and skips (two-lane blocks replace it);
  created after the skip weights. ``add_skip(x, j, skip)`` is the baseline's skip addition, for it to reuse.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import control
from pgolf_core.model.sites import NO_SITES, SiteBuilder
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class UNetParams:
    """No parameters: encoder/decoder split is num_layers // 2."""


class UNetSkips(nn.Module):
    PARTS = {
        "schedule": "nn.Module: encoder(), decoder() -> block indices; num_skips; run(block, x, x0, blocks, aux) -> (x, skip)",
        "decoder": "nn.Module: (topology, x, x0, blocks, aux, skips) -> x, the decoder half",
    }

    def __init__(self, num_layers: int, dim: int, sites: SiteBuilder = NO_SITES) -> None:
        super().__init__()
        self.num_layers, self.dim = num_layers, dim
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        self.schedule = sites.part("schedule", self)
        self.num_skips = self.schedule.num_skips if self.schedule is not None else min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = control(nn.Parameter(torch.ones(self.num_skips, dim, dtype=torch.float32)))
        self.decoder = sites.part("decoder", self)

    def encoder_blocks(self) -> list[int]:
        return self.schedule.encoder() if self.schedule is not None else list(range(self.num_encoder_layers))

    def decoder_blocks(self) -> list[int]:
        return self.schedule.decoder() if self.schedule is not None else list(range(self.num_encoder_layers, self.num_layers))

    def run(self, b: int, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor]) -> Tensor:
        """Block ``b`` at a decoder position, as the schedule runs it."""
        if self.schedule is not None:
            return self.schedule.run(b, x, x0, blocks, aux)[0]
        return blocks[b](x, x0, aux)

    def skip_index(self, j: int) -> int | None:
        """The skip weight of decoder position ``j`` (None: none); a schedule may say (#1285 reuses the last)."""
        rule = getattr(self.schedule, "skip_index", None)
        if rule is not None:
            return rule(j)
        return j if j < self.num_skips else None

    def add_skip(self, x: Tensor, j: int, skip: Tensor) -> Tensor:
        return x + self.skip_weights[j].to(dtype=x.dtype)[None, None, :] * skip

    def forward(self, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: dict[str, Tensor] | None = None) -> Tensor:
        aux = {} if aux is None else aux
        skips: list[Tensor] = []
        for b in self.encoder_blocks():
            if self.schedule is not None:
                x, skip = self.schedule.run(b, x, x0, blocks, aux)
            else:
                x = skip = blocks[b](x, x0, aux)
            skips.append(skip)
        if self.decoder is not None:
            return self.decoder(self, x, x0, blocks, aux, skips)
        for j, b in enumerate(self.decoder_blocks()):
            i = self.skip_index(j)
            if skips and i is not None:
                x = self.add_skip(x, i, skips.pop())
            x = self.run(b, x, x0, blocks, aux)
        return x


def build(params: UNetParams, ctx) -> UNetSkips:
    return UNetSkips(ctx.model.num_layers, ctx.model.model_dim, ctx)


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
