"""The run directory: log lines, metrics, resolved stack, artifact and submission.json, and who owns it.

A run writes into ``runs/<run_id>.partial/`` and is renamed to ``runs/<run_id>/`` only when it finished;
a failed run is renamed ``runs/<run_id>.failed/`` (``.failed-XXXX/`` when that exists) with the error at the
end of its log. Every file is written under a temporary name and renamed, so nothing that looks complete is
ever half-written; ``log.txt`` and ``metrics.jsonl`` grow line by line inside the ``.partial`` directory, whose
rename commits them. Only rank 0 writes. A full disk (ENOSPC/EDQUOT) on any write becomes a one-line
``DiskFullError`` naming the file; the temporary file is removed and the file it would have replaced is left
as it was. Any other failure to create or write (no permission, a name too long, a file where a directory
should be) is one ``ConfigError`` line naming the path.

Ownership: while a run (or a resume) uses a run id, it holds ``runs/<run_id>.lock`` (``RunLock``), created
atomically and holding the owner's pid, host and start time. A second run with the same id is refused
instead of writing into the same files, and a fresh run never adopts another run's ``.partial`` directory:
only ``--resume`` does, and only under the lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputClosedError, PgolfError, disk_full, disk_full_error

# Failures to create or write a path that the user's setup causes (and can fix), as opposed to a bug.
USER_PATH_ERRNOS = tuple(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENAMETOOLONG", "EISDIR", "ENOTDIR", "ENOENT", "EEXIST", "ELOOP", "ENOTEMPTY")
    if hasattr(errno, name)
)

FAILED = re.compile(r"\.failed(-[0-9a-f]+)?$")


def new_run_id(stack_name: str) -> str:
    """``<time>-<name>-<hex>``; the name is reduced to a safe slug (a stack's meta.name may hold anything)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stack_name or "").strip("._-")[:60]
    return f"{stamp}-{slug or 'run'}-{secrets.token_hex(2)}"


def path_error(exc: OSError, path: Path | str, doing: str, hint: str = "") -> PgolfError | None:
    """The one line for an OSError the user can fix (disk full, permissions, a name too long), else None."""
    if disk_full(exc):
        return disk_full_error(path)
    if exc.errno in USER_PATH_ERRNOS:
        reason = exc.strerror or type(exc).__name__
        return ConfigError(f"cannot {doing} {path}: {reason}{'; ' + hint if hint else ''}")
    return None


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
        if isinstance(exc, OSError):
            problem = path_error(exc, path, "write")
            if problem is not None:
                raise problem from None
        raise


def _print(msg: str) -> None:
    print(msg, flush=True)


# -- ownership ------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/<pid>/stat`` field 22), to tell a reused pid from its owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class RunLock:
    """Exclusive use of a run id: ``<out_dir>/<run_id>.lock``.

    Created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems), it holds JSON with the owner's
    pid, host, start time, process start tick and torchelastic job. A lock is stale, and taken over, when its
    owner is on this host and that process is gone (or its pid now belongs to another process), or when it was
    taken by an earlier attempt of the same torchelastic job (whose workers a restart has replaced, possibly on
    another node). A lock held from another host is never broken: the message names the host, pid and file.
    """

    def __init__(self, out_dir: str | Path, run_id: str) -> None:
        self.path = Path(out_dir) / f"{run_id}.lock"
        self.run_id = run_id
        self.token = secrets.token_hex(8)
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "pid_start": _process_start(os.getpid()),
            "job": os.environ.get("TORCHELASTIC_RUN_ID") or None,
            "attempt": _attempt(),
            "token": self.token,
        }

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        try:
            data = json.loads((path or self.path).read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        job = os.environ.get("TORCHELASTIC_RUN_ID")
        attempt = holder.get("attempt")
        if job and job != "none" and holder.get("job") == job and isinstance(attempt, int) and attempt < _attempt():
            return True
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool):
            return False
        if not _alive(pid):
            return True
        started = holder.get("pid_start")
        return started is not None and _process_start(pid) not in (None, started)

    def acquire(self) -> None:
        """Take the lock or raise one ``ConfigError`` line naming its holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise path_error(exc, self.path.parent, "create the output directory", "set run.out_dir (--out-dir) to a writable directory") or exc from None
        empty_since = None
        for _ in range(200):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # just created and not yet written, or damaged: give its writer a moment
                    empty_since = empty_since or time.monotonic()
                    if time.monotonic() - empty_since < 2.0:
                        time.sleep(0.02)
                        continue
                    raise ConfigError(
                        f"run id {self.run_id} is locked by {self.path}, which is unreadable; if no run uses this id, "
                        f"delete {self.path}"
                    ) from None
                if self._stale(holder):
                    self._take_over(holder)
                    continue
                raise ConfigError(
                    f"run id {self.run_id} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')} ({self.path}); choose another --run-id, or wait for that run to end "
                    "(delete the lock file only if that process is gone)"
                ) from None
            except OSError as exc:
                raise path_error(exc, self.path, "create the lock file", "set run.out_dir (--out-dir) to a writable directory") or exc from None
            try:
                os.write(fd, (json.dumps(self._record()) + "\n").encode())
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise path_error(exc, self.path, "write the lock file") or exc from None
            os.close(fd)
            self.held = True
            return
        raise ConfigError(f"run id {self.run_id}: could not take {self.path} (other runs keep taking it); retry")

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale (another run took it over in
        between), put it back."""
        aside = self.path.with_name(f".{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != holder:
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (a run whose lock was broken by hand leaves the new one alone)."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError:
                pass


def _attempt() -> int:
    from .procenv import attempt_or_zero

    return attempt_or_zero()


# -- the directory --------------------------------------------------------------------------------------
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

    def adopt(self, source: Path) -> None:
        """``--resume``: make ``source`` (this run's ``.partial``, ``.failed`` or ``.failed-XXXX``) the working
        directory. Call it holding the run's lock, after every check passed: a refused resume renames nothing."""
        if not self.is_master or source == self.path:
            return
        if self.path.exists():
            raise ConfigError(
                f"--resume {source}: {self.path} exists too (another attempt of this run); resume that one, or remove it"
            )
        try:
            os.replace(source, self.path)
        except OSError as exc:
            raise path_error(exc, source, "reopen the run directory") or exc from None

    def open(self, resume: bool = False) -> None:
        if not self.is_master:
            return
        if resume:
            if not self.path.is_dir():
                raise ConfigError(f"cannot resume: {self.path} does not exist")
        elif self.final.exists():
            raise ConfigError(f"run directory {self.final} already exists; choose another run.run_id (--run-id)")
        elif self.path.exists():
            raise ConfigError(
                f"{self.path} is the directory of a run with this id that was killed (or runs elsewhere); continue it with "
                f"--resume {self.path}, or choose another run.run_id (--run-id)"
            )
        hint = "set run.out_dir (--out-dir) to a writable directory, or a shorter run.run_id"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(exist_ok=resume)
            self._log = open(self.path / "log.txt", "a", encoding="utf-8", buffering=1)
            self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            self._close_quietly()
            raise path_error(exc, self.path, "create the run directory", hint) or exc from None

    def log(self, msg: str, console: bool = True) -> None:
        if not self.is_master:
            return
        if console and self.echo:
            try:
                (self.console or _print)(msg)
            except BrokenPipeError:
                self.echo = False  # nothing more to the closed stream; the log file still gets every line
                raise OutputClosedError(
                    "stdout was closed (broken pipe) while the run was printing; the run stopped. Keep the reader open, "
                    "or redirect to a file: pgolf run ... > out.txt"
                ) from None
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

    def _close_quietly(self) -> None:
        try:
            self._close()
        except (OSError, PgolfError):
            pass

    def close(self) -> None:
        """Flush and close the streamed files (before the ledger line is written from them)."""
        if self.is_master:
            self._close()

    def finish(self) -> Path:
        if self.is_master and self.path.exists():
            self._close()
            try:
                os.replace(self.path, self.final)
            except OSError as exc:
                raise path_error(exc, self.final, "commit the run directory as") or exc from None
        return self.final

    def fail(self, reason: str) -> Path | None:
        if not self.is_master or not self.path.exists():
            return None
        try:  # best effort: the disk may be the reason the run failed
            self.log(f"run_failed: {reason}", console=False)
        except PgolfError:
            pass
        self._close_quietly()
        failed = self.root / f"{self.run_id}.failed"
        if failed.exists():
            failed = self.root / f"{self.run_id}.failed-{secrets.token_hex(2)}"
        os.replace(self.path, failed)
        return failed
