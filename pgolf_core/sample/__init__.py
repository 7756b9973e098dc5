"""The built-in sample dataset: challenge-format shards built deterministically from bundled prose.

``data.path = "sample:sp1024"`` and ``data.tokenizer = "sample:sp1024"`` make any stack runnable offline:
the corpus shipped with pgolf (``corpus.txt``, documents separated by ``<|doc|>``) is tokenized with the
challenge's own SentencePiece model of that vocabulary (bundled: sp1024, and sp4096 / sp8192 for the stacks
that train on those, such as PR #1392), each document prefixed with BOS, every 8th document going to
validation. Shards are written once into a cache directory and reused. The same prose under every
vocabulary, so toy runs of stacks with different tokenizers read the same text.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION

HERE = Path(__file__).resolve().parent
SAMPLES = {f"sp{n}": HERE / f"fineweb_{n}_bpe.model" for n in (1024, 4096, 8192)}
PREFIX = "sample:"
VAL_EVERY = 8
TRAIN_SHARDS = 2


def cache_root() -> Path:
    return Path(os.environ.get("PGOLF_CACHE") or Path.home() / ".cache" / "pgolf")


def is_sample(value: str) -> bool:
    return value.startswith(PREFIX)


def sample_name(value: str) -> str:
    name = value[len(PREFIX) :]
    if name not in SAMPLES:
        from ..errors import DataError

        raise DataError(f"{value}: unknown built-in sample; available: {', '.join(PREFIX + n for n in SAMPLES)}")
    return name


def for_vocab(vocab_size: int) -> str | None:
    """The built-in sample whose tokenizer has ``vocab_size`` pieces (``sample:sp4096``), or None."""
    name = f"sp{vocab_size}"
    return PREFIX + name if name in SAMPLES else None


def tokenizer_path(value: str) -> str:
    return str(SAMPLES[sample_name(value)])


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def documents() -> list[str]:
    text = (HERE / "corpus.txt").read_text(encoding="utf-8")
    return [d.strip() for d in text.split("<|doc|>") if d.strip()]


def sample_dir(value: str) -> Path:
    """Where the sample's shards are (or will be) built: named by the corpus and tokenizer they come from."""
    name = sample_name(value)
    digest = hashlib.sha256((HERE / "corpus.txt").read_bytes() + SAMPLES[name].read_bytes()).hexdigest()[:12]
    return cache_root() / f"sample_{name}_{digest}"


def build_sample(value: str) -> Path:
    """Return the directory of the sample's shards, building them on first use."""
    import sentencepiece as spm

    name = sample_name(value)
    model = SAMPLES[name]
    out = sample_dir(value)
    digest = out.name.rsplit("_", 1)[1]
    if (out / "COMPLETE").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    encoded = [[sp.bos_id(), *sp.encode(doc)] for doc in documents()]
    val = [ids for i, ids in enumerate(encoded) if i % VAL_EVERY == 0]
    train = [ids for i, ids in enumerate(encoded) if i % VAL_EVERY != 0]
    per_shard = -(-len(train) // TRAIN_SHARDS)  # whole documents per shard, so every shard starts with BOS
    for k in range(TRAIN_SHARDS):
        docs = train[k * per_shard : (k + 1) * per_shard]
        write_shard(out / f"fineweb_train_{k:06d}.bin", np.asarray([t for ids in docs for t in ids], dtype=np.uint16))
    write_shard(out / "fineweb_val_000000.bin", np.asarray([t for ids in val for t in ids], dtype=np.uint16))
    (out / "COMPLETE").write_text(digest + "\n")
    return out
