"""Shuffled fixed-length sequences: each rank owns every ``world_size``-th shard and draws whole windows of
``seq_len + 1`` tokens from them in a random order, without replacement (PR #1394, ``ShuffledSequenceLoader``).

As the record's code does it, per rank:

* shards ``files[rank::world_size]`` (sorted); one ``numpy.random.Generator(PCG64(rank))`` drives everything
  (the seed is the rank, not the run's seed);
* per shard, a random phase ``rng.integers(max_phase + 1)`` with ``max_phase = min(seq_len - 1,
  max(0, n - seq_len - 1))`` (no draw when ``max_phase == 0``), then the window starts ``phase + k·seq_len`` for
  ``k`` in ``rng.permutation((n - 1 - phase) // seq_len)``; shards are prepared in order at construction;
* each sequence of a micro-batch picks a shard with probability proportional to its remaining windows
  (``rng.choice(len(files), p=remaining / total)``) and pops the *last* start of its list; when every list is
  empty all shards are prepared again (new phases, new permutations);
* a micro-batch has ``global_tokens // (world_size · grad_accum_steps) // seq_len`` sequences, inputs
  ``window[:-1]``, targets ``window[1:]``.

Shards are read through a memory map (a 100M-token shard is not loaded). The lists are prepared lazily at the
first ``next_batch`` (``seq_len`` arrives there), which draws the same numbers in the same order as the
record's constructor. Different process counts see different data (each rank has its own shards and stream).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch

from pgolf_core.contracts import Batch
from pgolf_core.data import HEADER_BYTES, read_shard_header
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class ShuffledParams:
    """No parameters: the shards come from [data] path, the RNG seed is the rank (as in PR #1394)."""


def shard_windows(rng: np.random.Generator, num_tokens: int, seq_len: int) -> list[int]:
    """One shard's window starts in draw order (the record's ``_reset_shard``); ``pop()`` takes the last."""
    max_phase = min(seq_len - 1, max(0, num_tokens - seq_len - 1))
    phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
    num_sequences = (num_tokens - 1 - phase) // seq_len
    order = rng.permutation(num_sequences)
    return (phase + order * seq_len).tolist()


class ShuffledSequenceLoader:
    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, vocab_size: int | None = None) -> None:
        self.files = list(files)[rank::world_size]
        if not self.files:
            raise ValueError(f"rank {rank} of {world_size} has no training shard ({len(files)} shards): the shuffled loader gives each rank every world_size-th shard")
        self.rank, self.world_size, self.device, self.vocab_size = rank, world_size, device, vocab_size
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.num_tokens = [read_shard_header(f) for f in self.files]
        self.seq_len: int | None = None
        self.start_inds: list[list[int]] = [[] for _ in self.files]
        self._maps: dict[int, np.memmap] = {}

    def _reset_all(self) -> None:
        for si in range(len(self.files)):
            self.start_inds[si] = shard_windows(self.rng, self.num_tokens[si], self.seq_len)

    def _map(self, si: int) -> np.memmap:
        mm = self._maps.get(si)
        if mm is None:
            mm = self._maps[si] = np.memmap(self.files[si], mode="r", dtype="<u2", offset=HEADER_BYTES, shape=(self.num_tokens[si],))
        return mm

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> Batch:
        if self.seq_len is None:
            self.seq_len = seq_len
            self._reset_all()
        elif seq_len != self.seq_len:
            raise ValueError(f"the shuffled loader was prepared for seq_len {self.seq_len}, asked for {seq_len}")
        device_tokens = global_tokens // (self.world_size * grad_accum_steps)
        bsz = device_tokens // seq_len
        remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
        x = torch.empty((bsz, seq_len), dtype=torch.int64)
        y = torch.empty((bsz, seq_len), dtype=torch.int64)
        for bi in range(bsz):
            total = remaining.sum()
            if total <= 0:
                self._reset_all()
                remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
                total = remaining.sum()
            si = int(self.rng.choice(len(self.files), p=remaining / total))
            start = self.start_inds[si].pop()
            remaining[si] -= 1
            window = torch.as_tensor(np.array(self._map(si)[start : start + seq_len + 1], dtype=np.int64))
            if self.vocab_size is not None and int(window.max()) >= self.vocab_size:
                raise ValueError(f"{self.files[si]}: token id {int(window.max())} >= vocab_size {self.vocab_size}")
            x[bi], y[bi] = window[:-1], window[1:]
        return Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seq_len": self.seq_len, "start_inds": [list(s) for s in self.start_inds]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.seq_len = state["seq_len"]
        self.start_inds = [list(s) for s in state["start_inds"]]


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="shuffled",
            slot="loader",
            params=ShuffledParams,
            build=lambda params, ctx: ShuffledSequenceLoader,
            summary="per-rank shards, random fixed-length windows without replacement, shard picked by remaining windows (PR #1394)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2",
            example='[loader]\nuse = "shuffled"',
        )
    )
