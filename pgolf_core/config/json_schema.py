"""``pgolf schema``: a JSON Schema (draft 2020-12) of the stack format with every installed technique's fields.

For editors (taplo / Even Better TOML read JSON Schema for TOML files): completion of table and key names,
types, defaults and help text. Each slot is a ``oneOf`` over its techniques, told apart by ``use``; the
``[[modifier]]`` array's items likewise. The schema describes what one file may contain, so nothing is
``required`` except ``use`` (a stack may inherit the rest through ``extends``) — and a slot table may even
omit ``use`` when it only sets parameters of the technique a base stack chose (checked after the merge).
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs

from ..hookspecs import SINGLE_SLOTS, SLOTS
from ..registry import Registry
from .schema import CORE_TABLES, SCHEMA_VERSION

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def type_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of a parameter's Python type (the types pgolf's strict converter accepts)."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str}.get(tp, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # Optional[X]: TOML has no null, so an optional key is simply left out.
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return type_schema(inner[0]) if len(inner) == 1 else {"anyOf": [type_schema(a) for a in inner]}
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no JSON Schema for parameter type {tp!r}")


def fields_schema(cls: type) -> dict[str, dict[str, Any]]:
    props = {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations naming types only imported for type checkers: fall back to attrs' view
        hints = {}
    for a in attrs.fields(cls):
        prop = type_schema(hints.get(a.name, a.type))
        text = a.metadata.get("help", "")
        if a.metadata.get("unit"):
            text += f" [{a.metadata['unit']}]"
        if text:
            prop["description"] = text.strip()
        if a.default is not attrs.NOTHING and not isinstance(a.default, attrs.Factory) and a.default is not None:
            prop["default"] = list(a.default) if isinstance(a.default, tuple) else a.default
        props[a.name] = prop
    return props


def _technique(reg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    t = reg.technique
    props = {"use": {"const": t.name, "description": t.summary}, **(extra or {}), **fields_schema(t.params)}
    return {
        "title": f"{t.name} ({reg.distribution} {reg.version})".replace(" )", ")"),
        "type": "object",
        "properties": props,
        "required": ["use"],
        "additionalProperties": False,
    }


LAYERS = {
    "description": "layer selector: 'all', 'last N', 'first N', a slice 'a:b' / '-4:', or a list of indices",
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}],
    "default": "all",
}


def stack_schema(registry: Registry) -> dict[str, Any]:
    props: dict[str, Any] = {
        "schema_version": {"const": SCHEMA_VERSION, "description": "stack format version"},
        "extends": {"type": "string", "description": "base stack file, relative to this one; tables merge key by key"},
        "requires": {
            "type": "object",
            "properties": {"plugins": {"type": "array", "items": {"type": "string"}, "description": "plugin distributions, e.g. 'pgolf-xsa>=0.2'"}},
            "additionalProperties": False,
        },
    }
    for name, cls in CORE_TABLES.items():
        props[name] = {"type": "object", "properties": fields_schema(cls), "additionalProperties": False}
    for slot in SINGLE_SLOTS:
        options = [_technique(r) for r in registry.all() if r.technique.slot == slot]
        inherited = {"type": "object", "not": {"required": ["use"]},
                     "description": "parameters of the technique chosen by the stack this one extends"}
        props[slot] = {"description": SLOTS[slot].returns, "oneOf": [*options, inherited]} if options else {"type": "object"}
    modifiers = [_technique(r, {"layers": LAYERS}) for r in registry.all() if r.technique.slot == "modifier"]
    props["modifier"] = {"type": "array", "description": "modifiers, applied in file order", "items": {"oneOf": modifiers} if modifiers else {"type": "object"}}
    return {
        "$schema": DIALECT,
        "$id": "https://pgolf.invalid/stack.schema.json",
        "title": "pgolf stack file",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }
