"""A resolved ``Stack`` back to TOML (what ``pgolf config`` prints and each run directory records)."""

from __future__ import annotations

from typing import Any

import attrs
import tomli_w

from .schema import SCHEMA_VERSION, Stack


def _table(instance: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(instance, recurse=False).items() if v is not None}


def stack_to_dict(stack: Stack) -> dict[str, Any]:
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    if stack.requires:
        out["requires"] = {"plugins": list(stack.requires)}
    for name in ("meta", "run", "data", "model"):
        out[name] = _table(getattr(stack, name))
    for slot, choice in stack.slots.items():
        out[slot] = {"use": choice.technique, **_table(choice.params)}
    if stack.modifiers:
        out["modifier"] = [{"use": m.technique, "layers": m.layers, **_table(m.params)} for m in stack.modifiers]
    return out


def _comment(text: str) -> str:
    """Text for a ``#`` comment line: as typed when it is one printable line, else escaped (``repr``), so a
    newline or a stray byte in a path or a ``--set`` value can never break the TOML a run writes."""
    return text if text.isprintable() else repr(text)


def stack_to_toml(stack: Stack) -> str:
    header = [f"# resolved from {_comment(stack.path)}"]
    header += [f"# --toy {_comment(o)}" for o in stack.toy]
    header += [f"# --set {_comment(o)}" for o in stack.overrides]
    header += [f"# legacy env: {_comment(e)}" for e in stack.legacy_env]
    return "\n".join(header) + "\n" + tomli_w.dumps(stack_to_dict(stack))
