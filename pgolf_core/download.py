"""``pgolf data download``: the challenge's published shards and tokenizer, from the Hugging Face Hub.

Same repository, layout and manifest as the official ``data/cached_challenge_fineweb.py``: the dataset repo
``willdepueoai/parameter-golf`` holds ``datasets/manifest.json``, the shards under
``datasets/datasets/fineweb10B_<variant>/`` and the tokenizers under ``datasets/tokenizers/``; locally they
land in ``<dir>/datasets/...``, ``<dir>/tokenizers/...`` and ``<dir>/manifest.json`` (``<dir>`` = ``./data``,
which is where the stacks' default ``data.path`` and ``data.tokenizer`` point). The manifest says how many
shards a variant has and which tokenizer files belong to it.

The sp8192 variant is not in that repository: the SP8192 records (PR #1394 on) name Kevin Clark's dataset repo
``kevclark/parameter-golf`` (same layout and manifest; their README runs the official script with
``MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf``), so that is the default repository for sp8192
(``VARIANT_REPOS``); ``--repo-id`` overrides it for any variant. The sp8192 tokenizer pgolf ships for its tests
and toy runs (``pgolf_core/sample/fineweb_8192_bpe.model``) is *unverified* against those shards; the one
downloaded with them is theirs.

Every file is checked against the content hash the Hub reports for it (sha256 for large files, the git
blob sha1 for small ones), and shards also by their header. A file already in place and verified is kept,
so an interrupted download resumes where it stopped (a partial file resumes inside the Hugging Face cache).
``huggingface_hub`` is an optional extra: ``pip install 'pgolf[hub]'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .errors import DataError, PgolfError

REPO_ID = "willdepueoai/parameter-golf"
VARIANT_REPOS = {"sp8192": "kevclark/parameter-golf"}
"""Variants published in another dataset repository than ``REPO_ID`` (same layout and manifest logic)."""
REMOTE_ROOT = "datasets"
STATE_FILE = ".pgolf-download.json"


@attrs.define(frozen=True)
class HubSource:
    """Where the files come from; ``repo_id`` None means the variant's repository (``repo_for_variant``),
    ``endpoint`` None means ``HF_ENDPOINT`` or huggingface.co."""

    repo_id: str | None = None
    remote_root: str = REMOTE_ROOT
    revision: str | None = None
    endpoint: str | None = None
    cache_dir: str | None = None


@attrs.define
class DownloadResult:
    dataset_dir: Path
    tokenizer_path: Path | None
    fetched: list[Path]
    kept: list[Path]


def dataset_dir_for_variant(variant: str) -> str:
    if variant == "byte260":
        return "fineweb10B_byte260"
    if re.fullmatch(r"sp\d+", variant):
        return f"fineweb10B_{variant}"
    raise DataError(f"--variant {variant}: unknown variant; use sp1024, sp4096 (sp<VOCAB_SIZE>) or byte260")


def repo_for_variant(variant: str) -> str:
    """The dataset repository that publishes ``variant``: ``VARIANT_REPOS`` or the official one."""
    return VARIANT_REPOS.get(variant, REPO_ID)


def local_path(dest: Path, relative: str) -> Path:
    """A path inside the remote root (``datasets/fineweb10B_sp1024/x.bin``, ``tokenizers/m.model``) → under ``dest``."""
    return dest.joinpath(*Path(relative).parts)


def plan(manifest: dict[str, Any], variant: str, train_shards: int, repo_id: str = REPO_ID) -> tuple[list[str], str, str | None]:
    """(paths relative to the remote root in download order, dataset dir, tokenizer model path) from the manifest."""
    name = dataset_dir_for_variant(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = ", ".join(d.get("name", "?") for d in manifest.get("datasets", []))
        raise DataError(f"manifest.json of {repo_id} has no dataset {name}; it has: {known or 'none'}")
    stats = entry.get("stats") or {}
    max_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards < 0:
        raise DataError(f"--train-shards {train_shards}: must be >= 0")
    if train_shards > max_train:
        raise DataError(f"{variant} has {max_train} training shards on {repo_id}; --train-shards {train_shards} asks for more")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if tok is None:
        raise DataError(f"manifest.json of {repo_id} has no tokenizer {tok_name!r} (dataset {name})")
    artifacts = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not artifacts:
        raise DataError(f"manifest.json of {repo_id}: tokenizer {tok_name!r} lists no files")
    files = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    files += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    model = next((a for a in artifacts if a.endswith(".model")), None)
    return files + artifacts, f"datasets/{name}", model


# ---------------------------------------------------------------------------------------------------------
# hashes


def content_hash(path: Path, etag: str) -> str:
    """The file's hash in the form of the Hub's etag: sha256 (64 hex, large files) or git blob sha1 (40 hex)."""
    if len(etag) == 64:
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkable(etag: str | None) -> bool:
    return bool(etag) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag) is not None


# ---------------------------------------------------------------------------------------------------------
# the Hub


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise PgolfError("pgolf data download needs huggingface_hub: pip install 'pgolf[hub]'") from None
    return huggingface_hub


class Downloader:
    """Fetches files of one dataset repo into ``dest``, verified, skipping what is already there."""

    def __init__(self, dest: Path, source: HubSource, log: Callable[[str], None] = print) -> None:
        self.dest = dest
        self.source = source
        self.log = log
        self.hub = _hub()
        self.endpoint = source.endpoint or os.environ.get("HF_ENDPOINT") or None
        self.state_path = dest / STATE_FILE
        self.state: dict[str, dict[str, Any]] = self._load_state()

    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        self.dest.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def _remote(self, relative: str) -> str:
        return f"{self.source.remote_root}/{relative}" if self.source.remote_root else relative

    def _where(self) -> str:
        return f"{self.endpoint or 'https://huggingface.co'} dataset {self.source.repo_id}"

    def metadata(self, relative: str) -> tuple[str | None, int | None]:
        remote = self._remote(relative)
        url = self.hub.hf_hub_url(self.source.repo_id, remote, repo_type="dataset", revision=self.source.revision, endpoint=self.endpoint)
        try:
            meta = self.hub.get_hf_file_metadata(url)
        except Exception as exc:
            raise DataError(f"{remote}: cannot reach it on {self._where()}: {_one_line(exc)}; check the network (or --endpoint) and rerun") from None
        return meta.etag, meta.size

    def is_current(self, target: Path, key: str, etag: str | None, size: int | None) -> bool:
        """Already downloaded and intact: same size and hash (hashed once, then remembered by size and mtime)."""
        if not target.is_file() or (size is not None and target.stat().st_size != size):
            return False
        st = target.stat()
        seen = self.state.get(key)
        if seen and seen.get("etag") == etag and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
            return True
        if not _checkable(etag) or content_hash(target, etag) != etag:
            return False
        self.state[key] = {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        self._save_state()
        return True

    def fetch(self, relative: str, index: int = 0, total: int = 0) -> tuple[Path, bool]:
        """Make ``dest/relative`` the verified remote file; returns (path, whether it was downloaded)."""
        target = local_path(self.dest, relative)
        key = Path(relative).as_posix()
        etag, size = self.metadata(relative)
        counter = f"[{index}/{total}] " if total else ""
        if self.is_current(target, key, etag, size):
            self.log(f"{counter}{key}: present, verified")
            return target, False
        self.log(f"{counter}{key}: downloading{f' ({_size(size)})' if size else ''}")
        remote = Path(self._remote(relative))
        try:
            cached = Path(
                self.hub.hf_hub_download(
                    repo_id=self.source.repo_id,
                    filename=remote.name,
                    subfolder=remote.parent.as_posix() if remote.parent != Path(".") else None,
                    repo_type="dataset",
                    revision=self.source.revision,
                    cache_dir=self.source.cache_dir,
                    endpoint=self.endpoint,
                )
            )
        except Exception as exc:
            raise DataError(f"{remote}: download from {self._where()} failed: {_one_line(exc)}; rerun to resume") from None
        blob = cached.resolve(strict=True)
        if _checkable(etag):
            got = content_hash(blob, etag)
            if got != etag:
                for path in {cached, blob}:
                    path.unlink(missing_ok=True)  # never reuse a corrupt cache entry
                raise DataError(f"{remote}: checksum mismatch (expected {etag}, got {got}); the corrupt copy was removed, rerun to download it again")
        elif size is not None and blob.stat().st_size != size:
            raise DataError(f"{remote}: {blob.stat().st_size} bytes, expected {size}; rerun to download it again")
        _place(blob, target)
        st = target.stat()
        self.state[key] = {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        self._save_state()
        return target, True


def _place(source: Path, target: Path) -> None:
    """Hard-link the cache blob into place (no second copy on disk), else copy; atomically either way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def download(variant: str, train_shards: int, dest: str | Path = "data", source: HubSource | None = None, log: Callable[[str], None] = print) -> DownloadResult:
    """Fetch the manifest, then the variant's validation shards, ``train_shards`` training shards and its tokenizer."""
    from .data import read_shard_header

    dest = Path(dest)
    source = source or HubSource()
    dataset_dir_for_variant(variant)  # fail on a bad variant before any network traffic
    if source.repo_id is None:
        source = attrs.evolve(source, repo_id=repo_for_variant(variant))
    loader = Downloader(dest, source, log)
    manifest_path, _ = loader.fetch("manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{manifest_path}: not valid JSON") from None
    files, dataset_rel, model_rel = plan(manifest, variant, train_shards, source.repo_id)
    fetched, kept = [], []
    for i, relative in enumerate(files, start=1):
        path, new = loader.fetch(relative, i, len(files))
        if path.suffix == ".bin":
            read_shard_header(path)
        (fetched if new else kept).append(path)
    return DownloadResult(local_path(dest, dataset_rel), local_path(dest, model_rel) if model_rel else None, fetched, kept)
