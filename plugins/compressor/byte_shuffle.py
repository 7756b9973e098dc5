"""Byte shuffle before brotli or lzma: the serialized artifact's bytes regrouped by position modulo ``stride``
(``"BSHF"`` header), then compressed (PR #1089; the #1218 record's ``_compress``).

``shuffle(data, 2)`` writes ``b"BSHF" + bytes([2])`` and then the bytes at even offsets followed by those at odd
offsets, so the low and high bytes of the fp16/int8 streams land in separate runs the entropy coder models
better. ``unshuffle`` reads the header back (data without it passes through, as in the record). Codecs as the
record calls them: ``brotli.compress(data, quality=11)`` (window 22, generic mode: brotli's defaults) or
``lzma.compress(data, preset=6)``. The label is the codec's, as in the record's ``int6+brotli`` lines.
"""

from __future__ import annotations

import lzma

import attrs
import brotli
import numpy as np

from pgolf_core.artifact import ByteCompressor
from pgolf_core.config.fields import in_range, one_of, param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique

MAGIC = b"BSHF"


@attrs.define(frozen=True, kw_only=True)
class ByteShuffleParams:
    stride: int = param(2, help="bytes are grouped by offset modulo stride (1 = no shuffle, no header)", unit="bytes", validator=in_range(1, 255))
    codec: str = param("brotli", help="compressor after the shuffle: 'brotli' or 'lzma' (the record's COMPRESSOR)", env="COMPRESSOR", validator=one_of("brotli", "lzma"))
    quality: int = param(11, help="brotli quality", validator=in_range(0, 11))
    preset: int = param(6, help="lzma preset (the record uses 6 here)", validator=in_range(0, 9))


def shuffle(data: bytes, stride: int = 2) -> bytes:
    """``MAGIC + stride`` then the bytes at offsets ``0, stride, 2·stride, ...``, then ``1, 1 + stride, ...``."""
    if stride <= 1 or len(data) < stride:
        return data
    src = np.frombuffer(data, dtype=np.uint8)
    return MAGIC + bytes([stride]) + np.concatenate([src[pos::stride] for pos in range(stride)]).tobytes()


def unshuffle(data: bytes) -> bytes:
    """Inverse of ``shuffle``; data without the header is returned as it is."""
    if len(data) < 5 or data[:4] != MAGIC:
        return data
    stride = data[4]
    if stride < 2:
        return data[5:]
    payload = np.frombuffer(data, dtype=np.uint8, offset=5)
    n = len(payload)
    out = np.empty(n, dtype=np.uint8)
    off = 0
    for pos in range(stride):
        k = n // stride + (1 if pos < n % stride else 0)
        out[pos::stride] = payload[off : off + k]
        off += k
    return out.tobytes()


class ByteShuffle(ByteCompressor):
    def __init__(self, stride: int = 2, codec: str = "brotli", quality: int = 11, preset: int = 6) -> None:
        self.stride, self.codec, self.quality, self.preset = stride, codec, quality, preset
        self.label = codec

    def compress_bytes(self, data: bytes) -> bytes:
        data = shuffle(data, self.stride)
        if self.codec == "lzma":
            return lzma.compress(data, preset=self.preset)
        return brotli.compress(data, quality=self.quality)

    def decompress_bytes(self, data: bytes) -> bytes:
        if self.codec == "lzma":
            raw = lzma.decompress(data)
        else:
            raw = brotli.decompress(data)
        return unshuffle(raw)


def build(params: ByteShuffleParams, ctx) -> ByteShuffle:
    return ByteShuffle(params.stride, params.codec, params.quality, params.preset)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="byte_shuffle",
            slot="compressor",
            params=ByteShuffleParams,
            build=build,
            summary="bytes regrouped by offset mod 2 ('BSHF' header), then brotli-11 or lzma-6 (PR #1089, #1218)",
            source="https://github.com/openai/parameter-golf/pull/1089",
            example='[compressor]\nuse = "byte_shuffle"\nstride = 2\ncodec = "brotli"',
        )
    )
