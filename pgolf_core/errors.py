"""User-facing errors.

Every problem a user can cause (a bad stack file, missing data, an oversized artifact) is raised as a
``PgolfError``. The CLI prints each of its problems on one line and exits with ``exit_code`` and no
traceback, so researchers see what to fix instead of a stack dump.
"""

from __future__ import annotations

import errno


class PgolfError(Exception):
    """One or more problems the user can fix; each entry of ``problems`` is a single line."""

    exit_code = 2

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(PgolfError):
    """A stack file, an override or a legacy environment variable is invalid."""


class DataError(PgolfError):
    """Shards, tokenizer or their agreement with the stack are wrong."""


class BudgetError(PgolfError):
    """The artifact (code + compressed weights) is over the size cap."""

    exit_code = 3


class DiskFullError(PgolfError):
    """A write failed because the disk (or the quota) is full; what was written before is intact."""

    exit_code = 5


class NonFiniteError(PgolfError):
    """The training loss or gradients became NaN/inf (``run.on_nonfinite = "stop"``)."""

    exit_code = 4


class StoppedError(PgolfError):
    """SIGTERM or SIGINT stopped the command (128 + SIGINT, as a shell reports an interrupted program)."""

    exit_code = 130


class OutputClosedError(PgolfError):
    """The reader of stdout went away (``pgolf run ... | head``): 128 + SIGPIPE, as a shell reports it."""

    exit_code = 141


DISK_FULL_ERRNOS = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_error(what: object) -> DiskFullError:
    return DiskFullError(
        f"disk full while writing {what}; free space or set run.out_dir (--out-dir) to a disk with room, "
        "then continue with --resume RUN_DIR if the run had checkpoints"
    )
