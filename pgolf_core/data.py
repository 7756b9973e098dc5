"""Challenge-format token shards: validated reading, the deterministic training stream, the val split.

A shard is a 256 × int32 header (magic 20240520, version 1, token count) followed by that many uint16
tokens. Training reads shards in sorted order and wraps around forever; each step takes one contiguous
chunk and gives every rank a disjoint span of it, exactly as the reference ``train_gpt.py`` does, so the
same seed sees the same tokens in the same order.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TRAIN_PATTERN = "fineweb_train_*.bin"
VAL_PATTERN = "fineweb_val_*.bin"


def read_shard_header(file: Path) -> int:
    """Validate a shard's header and size; returns its token count."""
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise DataError(f"{file}: cannot read shard ({exc.strerror})") from None
    if size < HEADER_BYTES:
        raise DataError(f"{file}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header; the file is truncated or not a shard")
    try:
        header = np.fromfile(file, dtype="<i4", count=HEADER_INTS)
    except OSError as exc:
        raise DataError(f"{file}: cannot read shard ({exc.strerror or exc})") from None
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{file}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); not a challenge token shard")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{file}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(
            f"{file}: size {size} bytes does not match its header ({count} tokens -> {expected} bytes); "
            "the shard is truncated or corrupt, re-download it"
        )
    return count


def load_shard(file: Path, vocab_size: int | None = None) -> Tensor:
    count = read_shard_header(file)
    try:
        tokens = np.fromfile(file, dtype="<u2", count=count, offset=HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"{file}: cannot read shard ({exc.strerror or exc})") from None
    if tokens.size != count:
        raise DataError(f"{file}: short read ({tokens.size} of {count} tokens)")
    if vocab_size is not None and count and int(tokens.max()) >= vocab_size:
        raise DataError(
            f"{file}: token id {int(tokens.max())} >= model.vocab_size {vocab_size}; "
            "the shards were made with a larger tokenizer than the stack declares"
        )
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def shard_files(directory: str | Path, pattern: str, what: str) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"data.path {directory}: directory not found; download shards or use data.path = 'sample:sp1024'")
    files = [Path(p) for p in sorted(glob.glob(glob.escape(str(root)) + "/" + pattern))]
    if not files:
        raise DataError(f"data.path {directory}: no {what} shards matching {pattern}")
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: not a file; a shard is a file of tokens (move what is there out of data.path)")
    return files


class TokenStream:
    """Reads shards in order, wrapping around forever (no sampling, no workers)."""

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
    """Each call takes one chunk of ``world_size × (local_tokens + 1)`` tokens; rank r gets span r."""

    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, vocab_size: int | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.stream = TokenStream(files, vocab_size)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        per_rank_span = local_tokens + 1
        chunk = self.stream.take(per_rank_span * self.world_size)
        start = self.rank * per_rank_span
        local = chunk[start : start + per_rank_span].to(dtype=torch.int64)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_validation_tokens(files: list[Path], seq_len: int, vocab_size: int | None = None) -> Tensor:
    tokens = torch.cat([load_shard(f, vocab_size) for f in files]).contiguous()
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(f"validation split has {tokens.numel()} tokens: too short for data.train_seq_len={seq_len}")
    return tokens[: usable + 1]
