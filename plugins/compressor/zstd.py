"""zstd compression of the serialized quantized model (level 22 in the #315 line of records).

Introduced to the challenge by the int6 records (e.g. PR #315, ``records/track_10min_16mb/2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``),
where ``zstandard.ZstdCompressor(level=22)`` replaced zlib.
"""

from __future__ import annotations

import attrs
import zstandard

from pgolf_core.artifact import ByteCompressor
from pgolf_core.config.fields import in_range, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ZstdParams:
    level: int = param(22, help="zstd compression level", validator=in_range(1, 22))


class Zstd(ByteCompressor):
    label = "zstd"

    def __init__(self, level: int) -> None:
        self.level = level

    def compress_bytes(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress_bytes(self, data: bytes) -> bytes:
        return zstandard.ZstdDecompressor().decompress(data)


def build(params: ZstdParams, ctx) -> Zstd:
    return Zstd(params.level)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="zstd",
            slot="compressor",
            params=ZstdParams,
            build=build,
            summary="zstandard compression of the artifact (level 22 in the int6 records)",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[compressor]\nuse = "zstd"\nlevel = 22',
        )
    )
