"""The reference's training stream: shards in sorted order, wrapping around forever, one contiguous chunk
per step split into disjoint per-rank spans (official baseline ``train_gpt.py``, ``DistributedTokenLoader``).

Each call takes ``world_size × (local_tokens + 1)`` tokens; rank r gets span r, so the same seed sees the same
tokens in the same order on any number of processes. No sampling, no workers, no document boundaries
(``Batch.aux`` is empty).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
from torch import Tensor

from pgolf_core.contracts import Batch
from pgolf_core.data import load_shard
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SequentialParams:
    """No parameters: the shards come from [data] path."""


class TokenStream:
    """Reads shards in order, wrapping around forever."""

    def __init__(self, files: list[Path], vocab_size: int | None = None) -> None:
        self.files = files
        self.vocab_size = vocab_size
        self.file_idx = 0
        self.tokens = load_shard(files[0], vocab_size)
        self.pos = 0

    def _advance_file(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = load_shard(self.files[self.file_idx], self.vocab_size)
        self.pos = 0

    def take(self, n: int) -> Tensor:
        chunks: list[Tensor] = []
        remaining = n
        while remaining > 0:
            avail = self.tokens.numel() - self.pos
            if avail <= 0:
                self._advance_file()
                continue
            k = min(remaining, avail)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def state_dict(self) -> dict[str, int]:
        return {"file_idx": self.file_idx, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.file_idx = state["file_idx"]
        self.tokens = load_shard(self.files[self.file_idx], self.vocab_size)
        self.pos = state["pos"]


class DistributedTokenLoader:
    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, vocab_size: int | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.stream = TokenStream(files, vocab_size)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> Batch:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        per_rank_span = local_tokens + 1
        chunk = self.stream.take(per_rank_span * self.world_size)
        start = self.rank * per_rank_span
        local = chunk[start : start + per_rank_span].to(dtype=torch.int64)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        return Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="sequential",
            slot="loader",
            params=SequentialParams,
            build=lambda params, ctx: DistributedTokenLoader,
            summary="shards in order, one contiguous chunk per step split across ranks (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[loader]\nuse = "sequential"',
        )
    )
