"""The run directory: log lines, metrics, resolved stack, artifact and submission.json.

A run writes into ``runs/<run_id>.partial/`` and is renamed to ``runs/<run_id>/`` only when it finished;
a failed run is renamed ``runs/<run_id>.failed/`` with the error at the end of its log. Every file is
written under a temporary name and renamed, so nothing that looks complete is ever half-written. Only
rank 0 writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import ConfigError


def new_run_id(stack_name: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{stack_name or 'run'}-{secrets.token_hex(2)}"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.path.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path / "log.txt", "a", encoding="utf-8", buffering=1)
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8", buffering=1)

    def log(self, msg: str, console: bool = True) -> None:
        if not self.is_master:
            return
        if console and self.echo:
            (self.console or _print)(msg)
        if self._log is not None:
            print(msg, file=self._log)

    def metric(self, **record: Any) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record, sort_keys=True) + "\n")

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
        for f in (self._log, self._metrics):
            if f is not None:
                f.close()
        self._log = self._metrics = None

    def finish(self) -> Path:
        if self.is_master and self.path.exists():
            self._close()
            os.replace(self.path, self.final)
        return self.final

    def fail(self, reason: str) -> Path | None:
        if not self.is_master or not self.path.exists():
            return None
        self.log(f"run_failed: {reason}", console=False)
        self._close()
        failed = self.root / f"{self.run_id}.failed"
        if failed.exists():
            failed = self.root / f"{self.run_id}.failed-{secrets.token_hex(2)}"
        os.replace(self.path, failed)
        return failed
