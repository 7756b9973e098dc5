"""User-facing errors.

Every problem a user can cause (a bad stack file, missing data, an oversized artifact) is raised as a
``PgolfError``. The CLI prints each of its problems on one line and exits with ``exit_code`` and no
traceback, so researchers see what to fix instead of a stack dump.
"""

from __future__ import annotations


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
