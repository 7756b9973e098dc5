"""The submission artifact: quantize → serialize → compress, size accounting against the cap, round trip.

Size accounting lives here and only here: ``bytes_total = bytes_code + len(compressed model)``. The code
counted is the packed ``train_gpt.py`` that ``pgolf export`` writes for the stack (``pgolf_core.export.
code_bytes``): exactly the code the stack runs, as the challenge counts it.
"""

from __future__ import annotations

import io
from typing import Any

from collections.abc import Mapping

import dataclasses
import torch

from .contracts import Fitting


@dataclasses.dataclass
class Artifact:
    blob: bytes
    raw_bytes: int
    stats: dict[str, int]
    bytes_code: int

    @property
    def bytes_model(self) -> int:
        return len(self.blob)

    @property
    def bytes_total(self) -> int:
        return self.bytes_code + self.bytes_model


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize(data: bytes) -> Any:
    """The inverse of ``serialize``; tensors, numbers, strings and containers only (no code runs on load)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class ByteCompressor:
    """A compressor over the serialized quantized object (``torch.save`` of its dicts of tensors and metadata),
    as every record before per-group compression did: a subclass implements ``compress_bytes`` and
    ``decompress_bytes``; ``label`` names it in the log lines (``final_int8_zlib_roundtrip``)."""

    label = ""

    def compress(self, obj: Any) -> bytes:
        return self.compress_bytes(serialize(obj))

    def decompress(self, data: bytes) -> Any:
        return deserialize(self.decompress_bytes(data))

    def compress_bytes(self, data: bytes) -> bytes:
        raise NotImplementedError

    def decompress_bytes(self, data: bytes) -> bytes:
        raise NotImplementedError


def build_artifact(
    weights: dict[str, torch.Tensor], roles: Mapping[str, str], quantizer: Any, compressor: Any, bytes_code: int, return_object: bool = False
) -> Any:
    """Quantize, let the quantizer fit the result to the cap if it can (``Fitting``: ``fit(obj, measure)``, e.g.
    selective pruning, with ``measure`` = code + compressed bytes), then compress the quantized object."""
    obj, stats = quantizer.quantize(weights, roles)
    if isinstance(quantizer, Fitting):
        obj = quantizer.fit(obj, lambda candidate: bytes_code + len(compressor.compress(candidate)))
    artifact = Artifact(compressor.compress(obj), len(serialize(obj)), stats, bytes_code)
    return (artifact, obj) if return_object else artifact


def load_artifact(blob: bytes, quantizer: Any, compressor: Any) -> dict[str, torch.Tensor]:
    return quantizer.dequantize(compressor.decompress(blob))
