"""Reading a reference script's environment variable the way that script does, for one field's type.

Shared by ``--legacy-env`` (``pgolf_core.config.load``) and exported scripts, which read the same variables at
run time (``pgolf_core.standalone``): both go through ``parse_env_value``.
"""

from __future__ import annotations

from typing import Any


def env_kind(field_type: Any) -> str:
    """The parsing rule of a field type: ``bool``, ``int``, ``float``, ``ints`` (a comma list), ``str``."""
    text = str(field_type)
    if field_type in (bool, "bool"):
        return "bool"
    if field_type in (int, "int") or "Optional[int]" in text:
        return "int"
    if field_type in (float, "float") or "Optional[float]" in text:
        return "float"
    if "tuple[int" in text:
        return "ints"
    return "str"


def parse_env_value(raw: str, kind: str, mapping: dict[str, Any] | None = None) -> Any:
    """``raw`` as the reference reads it: ``bool(int(v))`` for flags, ``int``/``float``, comma-separated ints;
    ``mapping`` translates the reference's values where the field's differ (``MUON_EQ_R=1`` → ``"bf16"``).
    Raises ``ValueError`` for a value the reference would reject."""
    text = raw.strip()
    if mapping is not None:
        if text not in mapping:
            raise ValueError(text)
        return mapping[text]
    if kind == "bool":
        return bool(int(text))
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "ints":
        return [int(v) for v in text.split(",") if v.strip()]
    return text
