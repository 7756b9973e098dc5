"""zlib compression of the serialized quantized model (official baseline, level 9)."""

from __future__ import annotations

import zlib

import attrs

from pgolf_core.artifact import ByteCompressor
from pgolf_core.config.fields import in_range, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ZlibParams:
    level: int = param(9, help="zlib compression level", validator=in_range(0, 9))


class Zlib(ByteCompressor):
    label = "zlib"

    def __init__(self, level: int) -> None:
        self.level = level

    def compress_bytes(self, data: bytes) -> bytes:
        return zlib.compress(data, level=self.level)

    def decompress_bytes(self, data: bytes) -> bytes:
        return zlib.decompress(data)


def build(params: ZlibParams, ctx) -> Zlib:
    return Zlib(params.level)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="zlib",
            slot="compressor",
            params=ZlibParams,
            build=build,
            summary="zlib compression of the artifact (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[compressor]\nuse = "zlib"\nlevel = 9',
        )
    )
