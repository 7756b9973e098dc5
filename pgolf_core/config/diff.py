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


def _modifier_uses(stack: Stack) -> list[tuple[str, int]]:
    """``(name, k)`` for each modifier, k counting the uses of that name from 1: modifiers are matched by name
    and use, not by position, so inserting one does not make every later one look changed."""
    seen: dict[str, int] = {}
    out = []
    for m in stack.modifiers:
        seen[m.technique] = seen.get(m.technique, 0) + 1
        out.append((m.technique, seen[m.technique]))
    return out


def _modifier_key(name: str, k: int, repeated: set[str]) -> str:
    """``modifier.xsa``, or ``modifier.value_embedding#2`` where a name is used more than once: the form
    ``--set`` takes back."""
    return f"modifier.{name}" + (f"#{k}" if name in repeated else "")


def _repeated(*stacks: Stack) -> set[str]:
    return {name for st in stacks for name, k in _modifier_uses(st) if k > 1}


def _flat(stack: Stack, repeated: set[str]) -> dict[str, Any]:
    data = stack_to_dict(stack)
    modifiers = data.pop("modifier", [])
    out = flatten(data)
    for (name, k), table in zip(_modifier_uses(stack), modifiers):
        out.update(flatten(table, _modifier_key(name, k, repeated) + "."))
    return out


def diff_stacks(old: Stack, new: Stack) -> list[tuple[str, Any, Any]]:
    """``(key, old value or None, new value or None)`` for every resolved key that differs, in stack order.

    When the modifiers both stacks share are applied in a different order, ``modifier order`` says so.
    """
    repeated = _repeated(old, new)
    a, b = _flat(old, repeated), _flat(new, repeated)
    keys = list(b) + [k for k in a if k not in b]
    rows = [(k, a.get(k), b.get(k)) for k in keys if k not in a or k not in b or not _same(a[k], b[k])]
    old_order, new_order = _modifier_uses(old), _modifier_uses(new)
    common = set(old_order) & set(new_order)
    if [k for k in old_order if k in common] != [k for k in new_order if k in common]:
        rows.append(("modifier order", [n for n, _ in old_order], [n for n, _ in new_order]))
    return rows


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    return x == y


def format_diff(old: Stack, new: Stack) -> str:
    rows = diff_stacks(old, new)
    head = f"# {new.path} over {old.path}: {len(rows)} resolved key(s) differ (old -> new)"
    return "\n".join([head, *(f"{k}: {toml_value(a)} -> {toml_value(b)}" for k, a, b in rows)]) + "\n"
