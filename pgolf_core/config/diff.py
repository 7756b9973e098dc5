"""``pgolf config A --diff B``: the resolved keys whose values differ, one ``key: old -> new`` line each.

The ablation view: what a recipe changes over the one it builds on, after ``extends`` and defaults are
resolved on both sides, so a value restated with the same number does not show and an inherited change does.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .dump import stack_to_dict
from .schema import Stack

UNSET = "(unset)"


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys; arrays of tables as ``name[i].key``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{path}[{i}]."))
        else:
            out[path] = value
    return out


def toml_value(value: Any) -> str:
    """A value as it would be written in a stack file (inline)."""
    if value is None:
        return UNSET
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _modifier_keys(stack: Stack) -> list[str]:
    """``modifier(xsa)``, or ``modifier(xsa)#2`` for a second use: modifiers are matched by name, not position,
    so inserting one does not make every later one look changed."""
    seen: dict[str, int] = {}
    keys = []
    for m in stack.modifiers:
        seen[m.technique] = seen.get(m.technique, 0) + 1
        keys.append(f"modifier({m.technique})" + (f"#{seen[m.technique]}" if seen[m.technique] > 1 else ""))
    return keys


def _flat(stack: Stack) -> dict[str, Any]:
    data = stack_to_dict(stack)
    modifiers = data.pop("modifier", [])
    out = flatten(data)
    for key, table in zip(_modifier_keys(stack), modifiers):
        out.update(flatten(table, key + "."))
    return out


def diff_stacks(old: Stack, new: Stack) -> list[tuple[str, Any, Any]]:
    """``(key, old value or None, new value or None)`` for every resolved key that differs, in stack order.

    When the modifiers both stacks share are applied in a different order, ``modifier order`` says so.
    """
    a, b = _flat(old), _flat(new)
    keys = list(b) + [k for k in a if k not in b]
    rows = [(k, a.get(k), b.get(k)) for k in keys if k not in a or k not in b or not _same(a[k], b[k])]
    old_order, new_order = _modifier_keys(old), _modifier_keys(new)
    common = set(old_order) & set(new_order)
    if [k for k in old_order if k in common] != [k for k in new_order if k in common]:
        rows.append(("modifier order", [k[9:-1] for k in old_order], [k[9:-1] for k in new_order]))
    return rows


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    return x == y


def format_diff(old: Stack, new: Stack) -> str:
    rows = diff_stacks(old, new)
    head = f"# {new.path} over {old.path}: {len(rows)} resolved key(s) differ (old -> new)"
    return "\n".join([head, *(f"{k}: {toml_value(a)} -> {toml_value(b)}" for k, a, b in rows)]) + "\n"
