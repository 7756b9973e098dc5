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

from collections.abc import Mapping

import dataclasses
import torch

from .config.schema import Stack
from .contracts import Fitting
from .registry import Registry


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


def code_files(stack: Stack, registry: Registry) -> list[Path]:
    """The source files this run executes: the ``pgolf_core`` modules loaded in the process (commands that do
    not train, such as downloads or statistics, are not counted) and the module of every technique in use."""
    core = Path(__file__).resolve().parent
    loaded = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    files = sorted(p for p in loaded if p.suffix == ".py" and core in p.parents)
    modules = _with_package_imports({r.module for r in registry.all() if r.technique.name in _used(stack)})
    for name in sorted(modules):
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            files.append(Path(path).resolve())
    return files


def _with_package_imports(modules: set[str]) -> set[str]:
    """Add, transitively, the modules of the same top-level package that these modules import (a technique that
    reuses another technique's functions ships that file too)."""
    import ast

    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = getattr(sys.modules.get(name), "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        root = name.split(".")[0]
        for node in ast.walk(ast.parse(Path(path).read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.split(".")[0] == root and target in sys.modules and target not in seen:
                    todo.append(target)
    return seen


def _used(stack: Stack) -> set[str]:
    return {c.technique for c in stack.slots.values()} | {m.technique for m in stack.modifiers}


def code_bytes(stack: Stack, registry: Registry, stack_toml: str) -> int:
    return sum(p.stat().st_size for p in code_files(stack, registry)) + len(stack_toml.encode("utf-8"))


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
