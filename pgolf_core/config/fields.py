"""``param()``: an attrs field with the metadata pgolf shows to users.

``help`` and ``unit`` feed ``pgolf show``; ``env`` names the reference script's environment variable, so
``pgolf run STACK --legacy-env`` can apply a PR README's run command unchanged; ``toy`` says how ``--toy``
shrinks the field where its unit and name do not (``pgolf_core.toy``).
"""

from __future__ import annotations

from typing import Any

import attrs


def param(
    default: Any = attrs.NOTHING,
    *,
    help: str = "",
    env: str | tuple[str, ...] | None = None,
    unit: str = "",
    validator: Any = None,
    env_values: dict[str, Any] | None = None,
    toy: Any = None,
) -> Any:
    """``env`` may be a tuple of aliases; under ``--legacy-env`` the last one present wins. ``env_values`` maps
    the reference's raw strings to this field's values where they differ (``MUON_EQ_R=1`` → ``"bf16"``).
    ``toy`` is a rule of ``pgolf_core.toy.RULES`` (``"horizon"``, ``"head_dim"``, ``"keep"``, ...) or a number:
    the most the field may be at toy size."""
    metadata = {"help": help, "unit": unit}
    if env:
        metadata["env"] = env
    if env_values:
        metadata["env_values"] = env_values
    if toy is not None:
        metadata["toy"] = toy
    return attrs.field(default=default, metadata=metadata, validator=validator)


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def in_range(lo: float, hi: float, *, hi_open: bool = False) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value < lo or value > hi or (hi_open and value == hi):
            bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
            raise ValueError(f"{attribute.name} must be in {bound}, got {value!r}")

    return check


def bounded(lo: float, hi: float) -> Any:
    """``lo <= value <= hi``, saying which side was crossed (a user who wrote -5 needs to read ">= 0")."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value < lo:
            raise ValueError(f"{attribute.name} must be >= {lo}, got {value!r}")
        if value > hi:
            raise ValueError(f"{attribute.name} must be <= {hi}, got {value!r}")

    return check


def no_nul(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Paths: the operating system cannot open a name holding a NUL character."""
    if "\x00" in value:
        raise ValueError(f"{attribute.name} must not contain a NUL character, got {value!r}")


RUN_ID_MAX = 200
"""Longest run id: the run directory's name gets a suffix (``.partial``, ``.failed-XXXX``, ``.lock``) and
most file systems allow 255 bytes per name."""


def run_id_problem(value: str) -> str | None:
    """Why ``value`` cannot name a run directory, or None. A run id is a name, never a path: no separators,
    no control characters, not ``.``/``..``, no leading dot or dash, and short enough for its suffixes."""
    if value in (".", ".."):
        return f"{value!r} is not a name"
    bad = sorted({c for c in value if c in "/\\" or not c.isprintable() or (c.isspace() and c != " ")})
    if bad:
        return f"{value!r} holds {', '.join(repr(c) for c in bad)}; use letters, digits, '-', '_' and '.'"
    if value.startswith((".", "-")):
        return f"{value!r} starts with {value[0]!r}; a run directory must not be hidden or look like an option"
    if len(value.encode("utf-8", "surrogatepass")) > RUN_ID_MAX:
        return f"{value[:20]!r}... is {len(value.encode('utf-8', 'surrogatepass'))} bytes long; at most {RUN_ID_MAX}"
    return None


def run_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    problem = run_id_problem(value) if value else None
    if problem:
        raise ValueError(f"{attribute.name} {problem}")


def one_of(*choices: str) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")

    return check
