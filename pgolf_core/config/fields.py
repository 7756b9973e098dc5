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


def one_of(*choices: str) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")

    return check
