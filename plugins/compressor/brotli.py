"""Brotli compression of the serialized quantized model (PR #1392: quality 11, default window and mode).

PR #1392 (``records/track_10min_16mb/2026-04-05_SP4096_DepthRecur_ParallelResid_Brotli``) writes
``brotli.compress(raw, quality=11)``: window ``lgwin = 22`` and mode generic are brotli's defaults. No byte
shuffle before it (unlike PR #1218 and #1334).
"""

from __future__ import annotations

import attrs
import brotli

from pgolf_core.artifact import ByteCompressor
from pgolf_core.config.fields import in_range, one_of, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique

MODES = {"generic": brotli.MODE_GENERIC, "text": brotli.MODE_TEXT, "font": brotli.MODE_FONT}


@attrs.define(frozen=True, kw_only=True)
class BrotliParams:
    quality: int = param(11, help="brotli quality (11 = slowest, smallest)", validator=in_range(0, 11))
    lgwin: int = param(22, help="base-2 log of the sliding window (brotli's default 22)", validator=in_range(10, 24))
    mode: str = param("generic", help="brotli's input hint: 'generic', 'text' or 'font'", validator=one_of(*MODES))


class Brotli(ByteCompressor):
    label = "brotli"

    def __init__(self, quality: int = 11, lgwin: int = 22, mode: str = "generic") -> None:
        self.quality, self.lgwin, self.mode = quality, lgwin, mode

    def compress_bytes(self, data: bytes) -> bytes:
        return brotli.compress(data, mode=MODES[self.mode], quality=self.quality, lgwin=self.lgwin)

    def decompress_bytes(self, data: bytes) -> bytes:
        return brotli.decompress(data)


def build(params: BrotliParams, ctx) -> Brotli:
    return Brotli(params.quality, params.lgwin, params.mode)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="brotli",
            slot="compressor",
            params=BrotliParams,
            build=build,
            summary="brotli compression of the artifact, quality 11, window 22, mode generic (PR #1392)",
            source="https://github.com/openai/parameter-golf/pull/1392",
            example='[compressor]\nuse = "brotli"\nquality = 11',
        )
    )
