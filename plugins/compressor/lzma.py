"""LZMA compression of the serialized quantized model (PR #1019 and PR #1319: ``lzma.compress(raw, preset=9)``).

That call writes the xz container with a CRC64 check; preset 9 without the ``extreme`` flag.
"""

from __future__ import annotations

import lzma

import attrs

from pgolf_core.artifact import ByteCompressor
from pgolf_core.config.fields import in_range, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class LzmaParams:
    preset: int = param(9, help="xz preset (0-9)", validator=in_range(0, 9))
    extreme: bool = param(False, help="add the 'extreme' flag to the preset (slower; the references do not)")


class Lzma(ByteCompressor):
    label = "lzma"

    def __init__(self, preset: int = 9, extreme: bool = False) -> None:
        self.preset = preset | (lzma.PRESET_EXTREME if extreme else 0)

    def compress_bytes(self, data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=self.preset)

    def decompress_bytes(self, data: bytes) -> bytes:
        return lzma.decompress(data)


def build(params: LzmaParams, ctx) -> Lzma:
    return Lzma(params.preset, params.extreme)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="lzma",
            slot="compressor",
            params=LzmaParams,
            build=build,
            summary="xz/LZMA compression of the artifact, preset 9 (PR #1019, PR #1319)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072",
            example='[compressor]\nuse = "lzma"\npreset = 9',
        )
    )
