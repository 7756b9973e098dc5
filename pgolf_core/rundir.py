"""The run directory: log lines, metrics, resolved stack, artifact and submission.json.

A run writes into ``runs/<run_id>.partial/`` and is renamed to ``runs/<run_id>/`` only when it finished;
a failed run is renamed ``runs/<run_id>.failed/`` with the error at the end of its log. Every file is
written under a temporary name and renamed, so nothing that looks complete is ever half-written; ``log.txt``
and ``metrics.jsonl`` grow line by line inside the ``.partial`` directory, whose rename commits them. Only
rank 0 writes. A full disk (ENOSPC/EDQUOT) on any write becomes a one-line ``DiskFullError`` naming the file;
the temporary file is removed and the file it would have replaced is left as it was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import ConfigError, PgolfError, disk_full, disk_full_error


def new_run_id(stack_name: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{stack_name or 'run'}-{secrets.token_hex(2)}"


def _write_all(f: Any, data: bytes) -> None:
    f.write(data)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` as a whole or not at all: a temporary sibling, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if disk_full(exc):
            raise disk_full_error(path) from None
        raise


def _print(msg: str) -> None:
    print(msg, flush=True)


class RunDir:
    def __init__(self, out_dir: str, run_id: str, is_master: bool, echo: bool = True) -> None:
        self.root = Path(out_dir)
        self.run_id = run_id
        self.is_master = is_master
        self.echo = echo
        self.console: Any = None  # replaces print for console lines (the progress bar draws around them)
        self.final = self.root / run_id
        self.path = self.root / f"{run_id}.partial"
        self._log = None
        self._metrics = None

    def open(self, resume: bool = False) -> None:
        if not self.is_master:
            return
        if resume:
            if not self.path.is_dir():
                raise ConfigError(f"cannot resume: {self.path} does not exist")
        elif self.final.exists():
            raise ConfigError(f"run directory {self.final} already exists; choose another run.run_id")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._log = open(self.path / "log.txt", "a", encoding="utf-8", buffering=1)
            self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            if disk_full(exc):
                raise disk_full_error(self.path) from None
            raise

    def log(self, msg: str, console: bool = True) -> None:
        if not self.is_master:
            return
        if console and self.echo:
            (self.console or _print)(msg)
        if self._log is not None:
            try:
                print(msg, file=self._log)
            except OSError as exc:
                if disk_full(exc):
                    raise disk_full_error(self.path / "log.txt") from None
                raise

    def metric(self, **record: Any) -> None:
        if self._metrics is not None:
            try:
                self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
            except OSError as exc:
                if disk_full(exc):
                    raise disk_full_error(self.path / "metrics.jsonl") from None
                raise

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.path / name
        if self.is_master:
            atomic_write(path, data)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def _close(self) -> None:
        files, self._log, self._metrics = (self._log, self._metrics), None, None
        for f in files:
            if f is not None:
                try:
                    f.close()
                except OSError as exc:
                    if disk_full(exc):
                        raise disk_full_error(Path(f.name)) from None
                    raise

    def finish(self) -> Path:
        if self.is_master and self.path.exists():
            self._close()
            os.replace(self.path, self.final)
        return self.final

    def fail(self, reason: str) -> Path | None:
        if not self.is_master or not self.path.exists():
            return None
        try:  # best effort: the disk may be the reason the run failed
            self.log(f"run_failed: {reason}", console=False)
        except PgolfError:
            pass
        try:
            self._close()
        except PgolfError:
            pass
        failed = self.root / f"{self.run_id}.failed"
        if failed.exists():
            failed = self.root / f"{self.run_id}.failed-{secrets.token_hex(2)}"
        os.replace(self.path, failed)
        return failed
