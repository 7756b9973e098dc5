"""Strict structuring of TOML tables into attrs classes with cattrs.

No silent coercion: ``1.7`` is not an int, ``"no"`` is not a bool, ``"3"`` is not a number. The one
widening allowed is an integer where a float is expected (``lr = 1``), which loses nothing. A float must be
finite and at most ``FLOAT_LIMIT`` in magnitude: ``nan < 0`` is false, so NaN would pass every range check
after it, and a value whose square overflows float32 turns into inf as soon as it reaches a tensor. Text must
be writable as UTF-8 (a run writes it back into ``stack.toml``). Every problem in a table is collected and
returned as ``(key path, message)`` pairs, so a user sees all of them at once.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Any

import attrs
import cattrs


FLOAT_LIMIT = 1e18
"""Largest magnitude of any float in a stack: its square (1e36) still fits in float32 (3.4e38)."""


class StrictTypeError(TypeError):
    pass


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python converts to text
        return f"{type(value).__name__} of {value.bit_length()} bits"
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StrictTypeError(f"expected int, got {_describe(value)}")
    if not -(2**63) <= value < 2**63:
        raise StrictTypeError(f"{_describe(value)} is out of range: integers in a stack are 64-bit, as TOML's")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StrictTypeError(f"expected float, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise StrictTypeError(f"expected a finite float, got {_describe(value)}")
    if abs(number) > FLOAT_LIMIT:
        raise StrictTypeError(f"{_describe(value)} is out of range: floats in a stack are limited to |x| <= {FLOAT_LIMIT:g}")
    return number


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise StrictTypeError(f"expected bool (true/false), got {_describe(value)}")
    return value


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise StrictTypeError(f"expected string, got {_describe(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # e.g. undecodable bytes of a command line, carried as surrogates
        raise StrictTypeError(f"expected UTF-8 text, got {_describe(value)} (it holds bytes that are not UTF-8)") from None
    return value


def _is_int_tuple(t: Any) -> bool:
    return typing.get_origin(t) is tuple and typing.get_args(t) in ((int, ...),)


def _strict_int_tuple(value: Any, _: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise StrictTypeError(f"expected a list of ints, got {_describe(value)}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise StrictTypeError(f"expected a list of ints, got element {_describe(item)}")
        out.append(_strict_int(item, int))
    return tuple(out)


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook_func(_is_int_tuple, _strict_int_tuple)
    return conv


CONVERTER = make_converter()


def _format_exception(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, StrictTypeError):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required key is missing"
    return str(exc) or type(exc).__name__


def field_names(cls: type) -> list[str]:
    return [a.name for a in attrs.fields(cls)]


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def structure_table(table: dict[str, Any], cls: type, path: str) -> tuple[Any, list[tuple[str, str]]]:
    """Structure ``table`` into ``cls``; returns (instance or None, [(key path, message), ...])."""
    problems: list[tuple[str, str]] = []
    known = field_names(cls)
    clean = {}
    for key, value in table.items():
        if key in known:
            clean[key] = value
        else:
            problems.append((f"{path}.{key}", f"unknown key '{key}'{did_you_mean(key, known)}; valid keys: {', '.join(known)}"))
    try:
        instance = CONVERTER.structure(clean, cls)
    except cattrs.ClassValidationError as exc:
        bad = set()
        whole = []  # raised by the class as a whole (a validator inside __init__): the field checks below say where
        for line in cattrs.transform_error(exc, path="$", format_exception=_format_exception):
            message, _, where = line.rpartition(" @ ")
            key = where[2:] if where.startswith("$.") else where
            bad.add(key)
            if key and key != "$":
                problems.append((f"{path}.{key}", message))
            else:
                whole.append(message)
        by_field = _validate_fields(clean, cls, path, skip=bad)
        problems += by_field
        problems += [(path, m) for m in whole if m not in {message for _, message in by_field}]
        return None, problems
    except (ValueError, TypeError) as exc:  # attrs validators (ranges, choices) raise from __init__
        problems.append((path + _field_in(str(exc), known), str(exc)))
        return None, problems
    return (instance if not problems else None), problems


def _validate_fields(values: dict[str, Any], cls: type, path: str, skip: set[str]) -> list[tuple[str, str]]:
    """Run the field validators of the well-typed values, so range errors show up beside type errors."""
    found = []
    for a in attrs.fields(cls):
        if a.name in skip or a.name not in values or a.validator is None:
            continue
        try:
            a.validator(None, a, CONVERTER.structure(values[a.name], a.type))
        except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
            found.append((f"{path}.{a.name}", str(exc)))
    return found


def _field_in(message: str, known: list[str]) -> str:
    for name in known:
        if message.startswith(name + " "):
            return "." + name
    return ""
