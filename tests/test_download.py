"""``pgolf data download`` against a Hugging Face-style file server on 127.0.0.1 with the official layout.

The server answers the Hub's resolve URLs (``/datasets/<repo>/resolve/<rev>/<path>``) with the headers
huggingface_hub reads (``X-Repo-Commit``, ``ETag``, and for large files ``X-Linked-Etag`` = sha256 and
``X-Linked-Size``), serves Range requests, and can corrupt or cut a file to test verification and resumption.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pgolf_core.cli import main
from pgolf_core.data import TRAIN_PATTERN, VAL_PATTERN, load_shard, shard_files
from pgolf_core.download import HubSource, download
from pgolf_core.errors import DataError, PgolfError
from pgolf_core.sample import tokenizer_path, write_shard
from pgolf.plugins.tokenizer.sentencepiece import load_model as load_tokenizer

REPO = "willdepueoai/parameter-golf"
SHARDS = "datasets/datasets/fineweb10B_sp1024"


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _resolve(self) -> tuple[str | None, bytes | None]:
        m = re.fullmatch(r"/datasets/(.+?)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if not m or m.group(1) != self.server.repo:
            return None, None
        path = self.server.root / m.group(3)
        return m.group(3), (path.read_bytes() if path.is_file() else None)

    def _send_headers(self, rel: str, data: bytes, status: int = 200, length: int | None = None, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Repo-Commit", "c0ffee" + "0" * 34)
        self.send_header("ETag", '"' + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() + '"')
        if rel.endswith((".bin", ".model")):  # large files live in LFS: the Hub reports their sha256
            self.send_header("X-Linked-Etag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()

    def _missing(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        rel, data = self._resolve()
        self.server.requests.append(("HEAD", rel))
        if data is None:
            return self._missing()
        self._send_headers(rel, data)

    def do_GET(self) -> None:
        rel, data = self._resolve()
        self.server.requests.append(("GET", rel))
        if data is None:
            return self._missing()
        body = self.server.corrupt.get(rel, data)
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
        chunk = body[start:]
        extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start else None
        self._send_headers(rel, data, 206 if start else 200, len(chunk), extra)
        if self.server.cut.get(rel, 0) > 0:  # drop the connection half-way
            self.server.cut[rel] -= 1
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(chunk)


@pytest.fixture
def hub(tmp_path):
    """A served copy of the official layout: manifest, 1 val + 3 train shards, the 1024 tokenizer."""
    root = tmp_path / "hub"
    shards = root / SHARDS
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["fineweb_val_000000", "fineweb_train_000000", "fineweb_train_000001", "fineweb_train_000002"]
    for name in names:
        tokens = rng.integers(0, 1024, 4000)
        tokens[0] = 1
        write_shard(shards / f"{name}.bin", tokens)
    (root / "datasets" / "tokenizers").mkdir()
    shutil.copy(tokenizer_path("sample:sp1024"), root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    (root / "datasets" / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<unk>\t0\n")
    manifest = {
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}},
            {"name": "fineweb10B_sp4096", "tokenizer_name": "sp_bpe_4096", "stats": {"files_train": 0, "files_val": 0}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}
        ],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.root, server.requests, server.corrupt, server.cut, server.repo = root, [], {}, {}, REPO
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.source = HubSource(endpoint=f"http://127.0.0.1:{server.server_port}", cache_dir=str(tmp_path / "hf-cache"))
    yield server
    server.shutdown()
    server.server_close()


def _gets(server) -> list[str]:
    return [rel for method, rel in server.requests if method == "GET"]


def test_download_reproduces_the_official_layout_and_the_data_loads(hub, tmp_path):
    dest = tmp_path / "data"
    result = download("sp1024", 2, dest, hub.source, log=lambda line: None)
    assert result.dataset_dir == dest / "datasets" / "fineweb10B_sp1024"
    assert result.tokenizer_path == dest / "tokenizers" / "fineweb_1024_bpe.model"
    assert (dest / "manifest.json").is_file()
    names = sorted(p.name for p in result.dataset_dir.iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for name in names:
        assert (result.dataset_dir / name).read_bytes() == (hub.root / SHARDS / name).read_bytes()
    assert len(shard_files(result.dataset_dir, TRAIN_PATTERN, "training")) == 2
    assert load_shard(shard_files(result.dataset_dir, VAL_PATTERN, "validation")[0], 1024).numel() == 4000
    load_tokenizer(str(result.tokenizer_path), 1024)
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin" not in _gets(hub)


def test_rerun_keeps_verified_files_and_fetches_only_new_shards(hub, tmp_path):
    dest = tmp_path / "data"
    download("sp1024", 1, dest, hub.source, log=lambda line: None)
    hub.requests.clear()
    lines: list[str] = []
    result = download("sp1024", 3, dest, hub.source, log=lines.append)
    assert _gets(hub) == [f"{SHARDS}/fineweb_train_000001.bin", f"{SHARDS}/fineweb_train_000002.bin"]
    assert len(result.kept) == 4 and len(result.fetched) == 2
    assert any("fineweb_val_000000.bin: present, verified" in line for line in lines)


def test_interrupted_download_fails_clearly_and_resumes(hub, tmp_path):
    dest = tmp_path / "data"
    broken = f"{SHARDS}/fineweb_train_000001.bin"
    hub.cut[broken] = 100  # every attempt is cut half-way
    with pytest.raises(DataError, match=r"fineweb_train_000001.bin: download from http://127.0.0.1:\d+ dataset willdepueoai/parameter-golf failed: .*rerun to resume"):
        download("sp1024", 2, dest, hub.source, log=lambda line: None)
    assert (dest / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").is_file()
    assert not (dest / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()
    hub.cut.clear()
    hub.requests.clear()
    result = download("sp1024", 2, dest, hub.source, log=lambda line: None)
    assert _gets(hub)[0] == broken and f"{SHARDS}/fineweb_val_000000.bin" not in _gets(hub)
    assert (result.dataset_dir / "fineweb_train_000001.bin").read_bytes() == (hub.root / broken).read_bytes()


def test_corrupt_transfer_is_refused_and_not_reused(hub, tmp_path):
    dest = tmp_path / "data"
    bad = f"{SHARDS}/fineweb_train_000000.bin"
    good = (hub.root / bad).read_bytes()
    hub.corrupt[bad] = good[:-2] + b"\xff\xff"  # same size, different bytes
    with pytest.raises(DataError, match=r"fineweb_train_000000.bin: checksum mismatch \(expected [0-9a-f]{64}, got [0-9a-f]{64}\)"):
        download("sp1024", 1, dest, hub.source, log=lambda line: None)
    assert not (dest / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()
    hub.corrupt.clear()
    result = download("sp1024", 1, dest, hub.source, log=lambda line: None)
    assert (result.dataset_dir / "fineweb_train_000000.bin").read_bytes() == good


def test_damaged_local_file_is_detected_and_fetched_again(hub, tmp_path):
    dest = tmp_path / "data"
    result = download("sp1024", 1, dest, hub.source, log=lambda line: None)
    shard = result.dataset_dir / "fineweb_train_000000.bin"
    original = shard.read_bytes()
    shard.unlink()  # break the hard link to the cache, then damage the copy in place
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    hub.requests.clear()
    download("sp1024", 1, dest, hub.source, log=lambda line: None)
    assert shard.read_bytes() == original


@pytest.mark.parametrize(
    "variant, shards, message",
    [
        ("sp1024", 4, "sp1024 has 3 training shards on willdepueoai/parameter-golf; --train-shards 4 asks for more"),
        ("sp8192", 1, "has no dataset fineweb10B_sp8192; it has: fineweb10B_sp1024, fineweb10B_sp4096"),
        ("sp4096", 0, "has no tokenizer 'sp_bpe_4096'"),
        ("gpt2", 1, "--variant gpt2: unknown variant"),
    ],
)
def test_manifest_driven_errors(hub, tmp_path, variant, shards, message):
    import attrs

    with pytest.raises(DataError, match=re.escape(message)):
        download(variant, shards, tmp_path / "data", attrs.evolve(hub.source, repo_id=REPO), log=lambda line: None)


def test_sp8192_comes_from_the_records_repository_with_the_same_manifest_logic(hub, tmp_path):
    """The SP8192 records name kevclark/parameter-golf; a served copy of that layout (sp8192 shards, the 8192
    tokenizer pgolf ships) is what `--variant sp8192` fetches by default, and the official repo is not asked."""
    import attrs

    from pgolf_core.download import repo_for_variant

    assert repo_for_variant("sp8192") == "kevclark/parameter-golf" and repo_for_variant("sp1024") == REPO
    root = hub.root
    shards = root / "datasets" / "datasets" / "fineweb10B_sp8192"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ["fineweb_val_000000", "fineweb_train_000000", "fineweb_train_000001"]:
        tokens = rng.integers(0, 8192, 3000)
        tokens[0] = 1
        write_shard(shards / f"{name}.bin", tokens)
    shutil.copy(tokenizer_path("sample:sp8192"), root / "datasets" / "tokenizers" / "fineweb_8192_bpe.model")
    manifest = {
        "datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192", "stats": {"files_train": 2, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"}],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    hub.repo = "kevclark/parameter-golf"
    dest = tmp_path / "data"
    result = download("sp8192", 1, dest, hub.source, log=lambda line: None)
    assert result.dataset_dir == dest / "datasets" / "fineweb10B_sp8192"
    assert result.tokenizer_path == dest / "tokenizers" / "fineweb_8192_bpe.model"
    assert sorted(p.name for p in result.dataset_dir.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert load_shard(result.dataset_dir / "fineweb_val_000000.bin", 8192).numel() == 3000
    load_tokenizer(str(result.tokenizer_path), 8192)
    assert _gets(hub) == ["datasets/manifest.json", "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
                          "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin", "datasets/tokenizers/fineweb_8192_bpe.model"]
    with pytest.raises(DataError, match=r"cannot reach it on http://127.0.0.1:\d+ dataset willdepueoai/parameter-golf"):
        download("sp8192", 1, tmp_path / "d2", attrs.evolve(hub.source, repo_id=REPO), log=lambda line: None)


def test_unreachable_endpoint_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    source = HubSource(endpoint=f"http://127.0.0.1:{port}", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"manifest.json: cannot reach it on http://127.0.0.1:\d+ dataset willdepueoai/parameter-golf"):
        download("sp1024", 1, tmp_path / "data", source, log=lambda line: None)


def test_cli_data_download(hub, tmp_path, capsys):
    code = main(["data", "download", "--variant", "sp1024", "--train-shards", "1", "--dir", str(tmp_path / "d"),
                 "--endpoint", hub.source.endpoint, "--cache-dir", hub.source.cache_dir])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "data ready: 4 files (4 downloaded, 0 already present and verified)" in out
    assert f'data.path = "{tmp_path / "d" / "datasets" / "fineweb10B_sp1024"}"' in out
    assert "[2/4] datasets/fineweb10B_sp1024/fineweb_train_000000.bin: downloading" in err


def test_without_huggingface_hub_the_fix_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PgolfError, match=r"needs huggingface_hub: pip install 'pgolf\[hub\]'"):
        download("sp1024", 1, tmp_path, HubSource(endpoint="http://127.0.0.1:9"), log=lambda line: None)
    assert main(["data", "download", "--dir", str(tmp_path)]) == 2
    assert "error: pgolf data download needs huggingface_hub" in capsys.readouterr().err
