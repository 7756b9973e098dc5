"""The submission artifact: quantize → serialize → compress, size accounting against the cap, round trip.

Size accounting lives here and only here: ``bytes_total = bytes_code + len(compressed model)``. The code
counted is what a run executes: the ``pgolf_core`` modules loaded by the run, the module of each technique
the stack uses, and the resolved stack file.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import attrs
import torch

from .config.schema import Stack
from .registry import Registry


@attrs.define
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
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def code_files(stack: Stack, registry: Registry) -> list[Path]:
    """The source files this run executes: the ``pgolf_core`` modules loaded in the process (commands that do
    not train, such as downloads or statistics, are not counted) and the module of every technique in use."""
    core = Path(__file__).resolve().parent
    loaded = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    files = sorted(p for p in loaded if p.suffix == ".py" and core in p.parents)
    modules = {r.module for r in registry.all() if r.technique.name in _used(stack)}
    for name in sorted(modules):
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            files.append(Path(path).resolve())
    return files


def _used(stack: Stack) -> set[str]:
    return {c.technique for c in stack.slots.values()} | {m.technique for m in stack.modifiers}


def code_bytes(stack: Stack, registry: Registry, stack_toml: str) -> int:
    return sum(p.stat().st_size for p in code_files(stack, registry)) + len(stack_toml.encode("utf-8"))


def build_artifact(weights: dict[str, torch.Tensor], quantizer: Any, compressor: Any, bytes_code: int) -> Artifact:
    obj, stats = quantizer.quantize(weights)
    raw = serialize(obj)
    return Artifact(compressor.compress(raw), len(raw), stats, bytes_code)


def load_artifact(blob: bytes, quantizer: Any, compressor: Any) -> dict[str, torch.Tensor]:
    return quantizer.dequantize(deserialize(compressor.decompress(blob)))
