"""Shards, the training stream, the validation split, the tokenizer and the built-in sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FIXTURE_1024, TOKENIZER_1024, TOKENIZER_4096
from pgolf_core.data import load_shard, load_validation_tokens, read_shard_header, shard_files
from pgolf_core.errors import DataError
from pgolf_core.sample import build_sample, write_shard
from pgolf.plugins.loader.sequential import DistributedTokenLoader, TokenStream
from pgolf.plugins.tokenizer.sentencepiece import byte_tables, load_model as load_tokenizer


def _shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_fixture_header_and_bos():
    (first,) = shard_files(FIXTURE_1024, "fineweb_val_*.bin", "validation")
    n = read_shard_header(first)
    tokens = load_shard(first)
    assert tokens.numel() == n == (first.stat().st_size - 1024) // 2
    assert int(tokens[0]) == 1  # every document starts with BOS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(magic=1234), "bad magic 1234 (expected 20240520)"),
        (dict(version=2), "unsupported shard version 2"),
        (dict(count=11), "does not match its header (11 tokens -> 1046 bytes)"),
    ],
)
def test_bad_shards_are_named(tmp_path, kwargs, message):
    path = _shard(tmp_path / "fineweb_train_000000.bin", range(10), **kwargs)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_shard(path)
    assert str(path) in str(info.value)


def test_truncated_shard(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="shorter than the 1024-byte shard header"):
        load_shard(path)


def test_token_id_beyond_vocab(tmp_path):
    path = _shard(tmp_path / "fineweb_train_000000.bin", [1, 5, 2000])
    with pytest.raises(DataError, match="token id 2000 >= model.vocab_size 1024"):
        load_shard(path, vocab_size=1024)


def test_missing_directory_and_no_shards(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        shard_files(tmp_path / "nope", "fineweb_train_*.bin", "training")
    with pytest.raises(DataError, match="no training shards matching"):
        shard_files(tmp_path, "fineweb_train_*.bin", "training")


def test_stream_wraps_and_ranks_get_disjoint_spans(tmp_path):
    _shard(tmp_path / "fineweb_train_000000.bin", range(0, 10))
    _shard(tmp_path / "fineweb_train_000001.bin", range(10, 15))
    files = shard_files(tmp_path, "fineweb_train_*.bin", "training")
    stream = TokenStream(files)
    assert stream.take(12).tolist() == list(range(12))
    assert stream.take(5).tolist() == [12, 13, 14, 0, 1]
    r0 = DistributedTokenLoader(files, 0, 2, torch.device("cpu"))
    r1 = DistributedTokenLoader(files, 1, 2, torch.device("cpu"))
    x0, y0, _ = r0.next_batch(8, 2, 2)  # local 2 tokens (+1) per rank per call
    x1, y1, _ = r1.next_batch(8, 2, 2)
    assert x0.tolist() == [[0, 1]] and y0.tolist() == [[1, 2]]
    assert x1.tolist() == [[3, 4]] and y1.tolist() == [[4, 5]]


def test_validation_tokens_trimmed_to_whole_sequences(tmp_path):
    path = _shard(tmp_path / "fineweb_val_000000.bin", range(23))
    tokens = load_validation_tokens([path], 5)
    assert tokens.numel() == 21  # 4 sequences of 5 plus the shifted target
    with pytest.raises(DataError, match="too short"):
        load_validation_tokens([path], 64)


def test_tokenizer_vocab_mismatch_and_missing(tmp_path):
    with pytest.raises(DataError, match="has vocab_size 4096 but model.vocab_size is 1024"):
        load_tokenizer(str(TOKENIZER_4096), 1024)
    with pytest.raises(DataError, match="file not found"):
        load_tokenizer(str(tmp_path / "x.model"), 1024)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"), 1024)


def test_byte_luts_follow_the_pieces():
    sp = load_tokenizer(str(TOKENIZER_1024), 1024)
    tables = byte_tables(sp, 1024, torch.device("cpu"))
    base, space, boundary = tables.base_bytes, tables.has_leading_space, tables.is_boundary
    assert bool(boundary[sp.bos_id()]) and int(base[sp.bos_id()]) == 0
    for piece in ("\u2581the", "ing"):
        tid = sp.piece_to_id(piece)
        assert int(base[tid]) == len(piece.lstrip("\u2581").encode())
        assert bool(space[tid]) == piece.startswith("\u2581")
    # Over a sentence, the table's byte count is the UTF-8 length of the decoded text (+1 for the leading space).
    text = "The quick brown fox jumps over the lazy dog."
    ids = torch.tensor([sp.bos_id(), *sp.encode(text)])
    prev, tgt = ids[:-1], ids[1:]
    nbytes = base[tgt].long() + (space[tgt] & ~boundary[prev]).long()
    assert int(nbytes.sum()) == len(text.encode())


def test_sample_is_deterministic_and_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("PGOLF_CACHE", str(tmp_path / "a"))
    a = build_sample("sample:sp1024")
    monkeypatch.setenv("PGOLF_CACHE", str(tmp_path / "b"))
    b = build_sample("sample:sp1024")
    names = sorted(p.name for p in a.glob("*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        tokens = load_shard(a / name, vocab_size=1024)
        assert int(tokens[0]) == 1 and tokens.numel() > 1000


def test_write_shard_round_trips(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(7))
    assert load_shard(tmp_path / "s.bin").tolist() == list(range(7))


def test_stream_position_round_trips_through_state_dict(tmp_path):
    _shard(tmp_path / "fineweb_train_000000.bin", range(0, 10))
    _shard(tmp_path / "fineweb_train_000001.bin", range(10, 15))
    files = shard_files(tmp_path, "fineweb_train_*.bin", "training")
    a = DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    a.next_batch(12, 3, 1)
    saved = a.state_dict()
    expected = a.next_batch(6, 3, 1)
    b = DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    b.load_state_dict(saved)
    got = b.next_batch(6, 3, 1)
    assert saved == {"file_idx": 1, "pos": 3} and all(torch.equal(e, g) for e, g in zip(expected[:2], got[:2]))
