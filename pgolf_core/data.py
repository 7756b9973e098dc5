"""Challenge-format token shards: validated reading and the validation split.

A shard is a 256 × int32 header (magic 20240520, version 1, token count) followed by that many uint16
tokens. How training reads them is the ``loader`` slot's (``sequential``: the reference's stream).
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
        import re

        from .sample import SAMPLES

        m = re.search(r"sp(\d+)", root.name)
        variant = f"sp{m.group(1)}" if m else "sp1024"
        offline = (
            f" or run offline at toy size on the built-in sample (--toy, or data.path = 'sample:{variant}')" if variant in SAMPLES else ""
        )
        raise DataError(
            f"data.path {directory}: directory not found; download the shards (pgolf data download --variant {variant}, "
            f"needs the network){offline}"
        )
    files = [Path(p) for p in sorted(glob.glob(glob.escape(str(root)) + "/" + pattern))]
    if not files:
        raise DataError(f"data.path {directory}: no {what} shards matching {pattern}")
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: not a file; a shard is a file of tokens (move what is there out of data.path)")
    return files


def load_validation_tokens(files: list[Path], seq_len: int, vocab_size: int | None = None) -> Tensor:
    tokens = torch.cat([load_shard(f, vocab_size) for f in files]).contiguous()
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(f"validation split has {tokens.numel()} tokens: too short for data.train_seq_len={seq_len}")
    return tokens[: usable + 1]
