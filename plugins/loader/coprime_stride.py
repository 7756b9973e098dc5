"""Coprime-stride multi-shard loader: every batch mixes windows from several shards, each shard walked with a
random stride coprime to its number of windows (PR #726; the #1060 and #1218 records' ``DistributedTokenLoader``).

Per call (one micro-batch of every rank), with ``num_seqs`` sequences of ``seq_len`` per rank and ``G =
num_seqs · world_size`` global windows:

1. ``progress = min(batches_built / progress_batches, 1)``; each eligible shard (at least one whole window) is
   weighted by ``remaining_windows ** (0.9 - 0.4 · progress)`` (its remaining windows in the current pass, or all
   of them before its first), and ``mix = round(low + progress · (high - low))`` distinct shards are drawn
   without replacement with ``low = min(max(8, W), shards, G)``, ``high = min(max(32, 8 W), shards, G)``;
2. each drawn shard gets one window plus a multinomial share of the other ``G - mix``; shard order is permuted;
3. a shard's windows come from its cursor: a random phase in ``[0, seq_len)`` (so windows start off the
   multiple of ``seq_len``), ``n = (tokens - 1 - phase) // seq_len`` windows, a random start and a random stride
   coprime to ``n``, so one pass visits every window once in a scattered order; the cursor is redrawn when the
   pass is exhausted;
4. each shard's windows are shuffled, then taken round-robin across shards in random order; rank ``r`` gets
   the global windows ``r, r + W, ...``.

All draws come from one ``numpy`` PCG64 generator seeded with an FNV-1a-style hash of the shard paths, as the
record seeds it from ``str(path)``. The record's runs read ``./data/datasets/fineweb10B_sp4096/...``, so by
default the names hashed are ``seed_dir/<file name>`` (``data/datasets/fineweb10B_sp{vocab}``), whatever
directory holds the shards here: the same shards give the same windows anywhere. ``seed_dir = ""`` hashes the
real paths instead, as the script does wherever it runs. Windows carry no document boundaries (``aux`` empty).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from pgolf_core.config.fields import param, positive
from pgolf_core.contracts import Batch
from pgolf_core.data import HEADER_BYTES, read_shard_header
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class CoprimeStrideParams:
    seed_dir: str = param(
        "data/datasets/fineweb10B_sp{vocab}",
        help="directory name hashed with each shard's file name to seed the sampler ({vocab} = model.vocab_size), as the "
        "record's runs saw their shards; '' hashes the real paths",
    )
    progress_batches: int = param(1800, help="loader calls over which the shard mix widens and the weighting flattens", validator=positive)


def path_seed(names: list[str]) -> int:
    """The record's seed: for every byte of every path, ``seed = ((seed ^ b) * 1099511628211) mod 2^64``."""
    seed = 0
    for name in names:
        for b in name.encode():
            seed = ((seed ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return seed


class CoprimeStrideLoader:
    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, vocab_size: int | None = None,
                 seed_dir: str = "", progress_batches: int = 1800) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.files = [Path(f) for f in files]
        self.progress_batches = progress_batches
        self._num_tokens = np.array([read_shard_header(f) for f in self.files], dtype=np.int64)
        if seed_dir:
            names = [str(Path(seed_dir.format(vocab=vocab_size)) / f.name) for f in self.files]
        else:
            names = [str(f) for f in self.files]
        self._rng = np.random.Generator(np.random.PCG64(path_seed(names)))
        n = len(self.files)
        self._phase = np.zeros(n, dtype=np.int64)
        self._count = np.zeros(n, dtype=np.int64)
        self._next = np.zeros(n, dtype=np.int64)
        self._start = np.zeros(n, dtype=np.int64)
        self._stride = np.ones(n, dtype=np.int64)
        self._init = np.zeros(n, dtype=np.bool_)
        self._batches_built = 0
        self._mmaps: dict[int, np.memmap] = {}

    # -- the record's sampler ------------------------------------------------------------------------------
    def _coprime_stride(self, n: int) -> int:
        if n <= 1:
            return 1
        while True:
            s = int(self._rng.integers(1, n))
            if math.gcd(s, n) == 1:
                return s

    def _reset_cursor(self, si: int, seq_len: int) -> None:
        nt = int(self._num_tokens[si])
        max_phase = min(seq_len - 1, max(0, nt - seq_len - 1))
        phase = int(self._rng.integers(max_phase + 1)) if max_phase > 0 else 0
        bc = (nt - 1 - phase) // seq_len
        self._phase[si], self._count[si], self._next[si] = phase, bc, 0
        self._start[si] = int(self._rng.integers(bc)) if bc > 1 else 0
        self._stride[si] = self._coprime_stride(bc)
        self._init[si] = True

    def _take(self, si: int, seq_len: int, count: int, out: list[tuple[int, int]]) -> None:
        rem = count
        while rem > 0:
            if not self._init[si] or self._next[si] >= self._count[si]:
                self._reset_cursor(si, seq_len)
            bc, ni = int(self._count[si]), int(self._next[si])
            take = min(rem, bc - ni)
            phase, start, stride = int(self._phase[si]), int(self._start[si]), int(self._stride[si])
            for j in range(take):
                out.append((si, phase + ((start + (ni + j) * stride) % bc) * seq_len))
            self._next[si] = ni + take
            rem -= take

    def global_windows(self, seq_len: int, gns: int) -> list[tuple[int, int]]:
        """The ``gns`` (shard, offset) windows of one call, for all ranks."""
        eligible = np.nonzero((self._num_tokens - 1) // seq_len > 0)[0].astype(np.int64)
        base = ((self._num_tokens - 1) // seq_len)[eligible]
        ec = int(eligible.size)
        progress = min(self._batches_built / float(self.progress_batches), 1.0)
        remaining = np.empty(ec, dtype=np.float64)
        for i, si in enumerate(eligible.tolist()):
            remaining[i] = float(max(int(self._count[si]) - int(self._next[si]), 1)) if self._init[si] else float(base[i])
        weights = np.power(remaining, 0.90 - 0.40 * progress)
        ws = float(weights.sum())
        if not np.isfinite(ws) or ws <= 0.0:
            weights = np.ones(ec, dtype=np.float64)
            ws = float(weights.sum())
        probs = weights / ws
        low = min(max(8, self.world_size), ec, gns)
        high = min(max(32, self.world_size * 8), ec, gns)
        mix = max(1, min(int(round(low + progress * (high - low))), ec, gns))
        cp = self._rng.choice(ec, size=mix, replace=False, p=probs)
        cs = eligible[cp]
        cpr = probs[cp].copy()
        cpr /= cpr.sum()
        counts = np.ones(mix, dtype=np.int64)
        if gns - mix > 0:
            counts += self._rng.multinomial(gns - mix, cpr).astype(np.int64)
        perm = self._rng.permutation(mix)
        cs, counts = cs[perm], counts[perm]
        buckets: list[list[tuple[int, int]]] = []
        for si, cnt in zip(cs.tolist(), counts.tolist()):
            b: list[tuple[int, int]] = []
            self._take(int(si), seq_len, int(cnt), b)
            if b:
                if len(b) > 1:
                    b = [b[int(k)] for k in self._rng.permutation(len(b)).tolist()]
                buckets.append(b)
        windows: list[tuple[int, int]] = []
        active = [i for i, bk in enumerate(buckets) if bk]
        while active:
            new_active: list[int] = []
            for oi in self._rng.permutation(len(active)).tolist():
                bi = active[oi]
                if buckets[bi]:
                    windows.append(buckets[bi].pop())
                if buckets[bi]:
                    new_active.append(bi)
            active = new_active
        return windows

    def _shard(self, si: int) -> np.memmap:
        if si not in self._mmaps:
            n = int(self._num_tokens[si])
            self._mmaps[si] = np.memmap(self.files[si], mode="r", dtype="<u2", offset=HEADER_BYTES, shape=(n,))
        return self._mmaps[si]

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> Batch:
        num_seqs = global_tokens // (self.world_size * grad_accum_steps) // seq_len
        mine = self.global_windows(seq_len, num_seqs * self.world_size)[self.rank :: self.world_size]
        x = torch.empty((num_seqs, seq_len), dtype=torch.int64)
        y = torch.empty((num_seqs, seq_len), dtype=torch.int64)
        for slot, (si, pos) in enumerate(mine):
            window = torch.as_tensor(np.array(self._shard(si)[pos : pos + seq_len + 1], dtype=np.int64))
            x[slot], y[slot] = window[:-1], window[1:]
        self._batches_built += 1
        return Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "cursors": {k: getattr(self, f"_{k}").tolist() for k in ("phase", "count", "next", "start", "stride", "init")},
            "batches_built": self._batches_built,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        for k, values in state["cursors"].items():
            current = getattr(self, f"_{k}")
            setattr(self, f"_{k}", np.array(values, dtype=current.dtype))
        self._batches_built = int(state["batches_built"])


def build(params: CoprimeStrideParams, ctx):
    def make(files, rank, world_size, device, vocab_size=None) -> CoprimeStrideLoader:
        return CoprimeStrideLoader(files, rank, world_size, device, vocab_size, params.seed_dir, params.progress_batches)

    return make


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="coprime_stride",
            slot="loader",
            params=CoprimeStrideParams,
            build=build,
            summary="windows sampled across shards, each shard walked with a random coprime stride, mix widening over training (PR #726, #1060, #1218)",
            source="https://github.com/openai/parameter-golf/pull/726",
            example='[loader]\nuse = "coprime_stride"',
        )
    )
