"""A resolved stack as the reference script's environment variables: the inverse of ``--legacy-env``.

``pgolf config STACK --as-env`` prints these so the same recipe can be run through the original
``train_gpt.py`` (and ``pgolf bench --reference`` passes them to it). The names come from the same
metadata ``--legacy-env`` reads, so what is printed here, fed back with ``--legacy-env``, resolves to the
same stack:

- every core field and every chosen technique's parameter whose ``env`` metadata names a variable (the
  first name when it lists aliases);
- a modifier's layer selector through its technique's ``layers_env``, when one of those variables maps back
  to exactly this selector (``XSA_LAST_N=4`` for ``"last 4"``, ``VE_LAYERS=9,10`` for ``[9, 10]``), with the
  technique's other layer variables at their "unset" value (``CANON_FIRST_N=0`` beside ``CANON_LAST_N=5``);
- ``enable_env`` switches: ``NAME=1`` for a modifier the stack uses, ``NAME=0`` for an installed one it does
  not, because several reference scripts turn their techniques on by default;
- ``select_env`` switches of the chosen slot techniques: the variables by which a script that offers several
  techniques for a slot picks this one (``EMA_ENABLED=0 SWA_ENABLED=1 TIGHT_SWA=1``), since its default may
  be another.

What the environment cannot say (a selector no variable expresses, two modifiers wanting different values
of one variable) is returned as notes rather than guessed.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable

import attrs

from .config.checks import parse_layers
from .config.schema import CORE_TABLES, Stack
from .registry import Registry


@attrs.define
class EnvExport:
    """Variables in emission order (core tables, slots, modifiers) and the notes on what did not fit."""

    variables: dict[str, str] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    origins: dict[str, str] = attrs.field(factory=dict)  # NAME -> stack key it came from

    def lines(self) -> list[str]:
        """``NAME=value`` lines, values shell-quoted where needed (``eval``/``set -a`` safe)."""
        return [f"{name}={shlex.quote(value)}" for name, value in self.variables.items()]


def env_names(attribute: attrs.Attribute) -> tuple[str, ...]:
    names = attribute.metadata.get("env") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def format_env_value(value: Any) -> str:
    """A value the way the reference scripts parse it back.

    Bools are ``1``/``0`` (the scripts do ``bool(int(...))``); sequences are comma-joined. Integral floats
    are written without a fraction because some scripts read a field pgolf types as float with ``int()``
    (the baseline's ``MLP_MULT``); ``float("2")`` reads it back the same. Other floats use ``repr``, which
    round-trips exactly.
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(format_env_value(v) for v in value)
    return str(value)


def stack_to_env(stack: Stack, registry: Registry) -> EnvExport:
    out = EnvExport()
    for table_name in CORE_TABLES:
        _emit_fields(out, getattr(stack, table_name), table_name)
    for slot, choice in stack.slots.items():
        where = f"{slot}({choice.technique})"
        _emit_selection(out, registry, slot, choice, where)
        _emit_fields(out, choice.params, where)
    used: set[str] = set()
    for index, mod in enumerate(stack.modifiers):
        where = f"modifier[{index}]({mod.technique})"
        reg = registry.get("modifier", mod.technique)
        technique = reg.technique if reg is not None else None
        if technique is not None and technique.enable_env:
            used.add(technique.enable_env)
            _put(out, technique.enable_env, "1", where)
        _emit_fields(out, mod.params, where)
        if technique is not None:
            _emit_layers(out, technique.layers_env, mod.layers, stack.model.num_layers, where)
    for reg in registry.all():
        name = reg.technique.enable_env
        if reg.technique.slot == "modifier" and name and name not in used and name not in out.variables:
            _put(out, name, "0", f"modifier {reg.technique.name} (not in the stack)")
    return out


def selection_env(technique: Any, params: Any) -> dict[str, str]:
    """The switches by which a reference script chooses this slot technique among its alternatives."""
    select = technique.select_env
    return dict(select(params) if callable(select) else select)


def _emit_selection(out: EnvExport, registry: Registry, slot: str, choice: Any, where: str) -> None:
    """The chosen technique's switches (``EMA_ENABLED=0 SWA_ENABLED=1 TIGHT_SWA=1``), before its parameters as
    the records' commands write them. A technique that declares none, in a slot whose alternatives switch by
    environment, gets a note: the script would run its own default for the slot."""
    reg = registry.get(slot, choice.technique)
    switches = selection_env(reg.technique, choice.params) if reg is not None else {}
    for name, value in switches.items():
        _put(out, name, value, f"{where} (selects it)")
    if not switches:
        others = sorted({name for r in registry.all() if r.technique.slot == slot for name in _declared_selection(r.technique)})
        if others:
            out.notes.append(
                f"{where}: declares no reference switch among {' / '.join(others)}; a script that switches its {slot} "
                "by these runs its own default"
            )


def _declared_selection(technique: Any) -> list[str]:
    select = technique.select_env
    if not callable(select):
        return list(select)
    try:
        return list(select(technique.params()))
    except Exception:  # params without defaults: the names are not knowable without a stack
        return []


def _emit_fields(out: EnvExport, instance: Any, where: str) -> None:
    for attribute in attrs.fields(type(instance)):
        names = env_names(attribute)
        if not names:
            continue
        value = getattr(instance, attribute.name)
        # An unset optional or an empty string means "the script's own default" (RUN_ID: a fresh id).
        if value is None or value == "":
            continue
        mapping = attribute.metadata.get("env_values")
        if mapping is not None:
            # The reference spells this field's values its own way (MUON_EQ_R=1 for "bf16"): write its spelling.
            raw = next((k for k, v in mapping.items() if v == value), None)
            if raw is None:
                out.notes.append(
                    f"{where}.{attribute.name}={value!r} has no {names[0]} value (it takes {', '.join(sorted(mapping))}); "
                    "the script runs its own default"
                )
                continue
            _put(out, names[0], raw, f"{where}.{attribute.name}")
            continue
        _put(out, names[0], format_env_value(value), f"{where}.{attribute.name}")


def _put(out: EnvExport, name: str, value: str, origin: str) -> None:
    if name in out.variables and out.variables[name] != value:
        out.notes.append(
            f"{name}: {out.origins[name]} wants {out.variables[name]!r} but {origin} wants {value!r}; "
            f"the script reads one value, kept {out.variables[name]!r}"
        )
        return
    out.variables.setdefault(name, value)
    out.origins.setdefault(name, origin)


def _layer_candidates(selector: Any) -> list[str]:
    """Strings a reference layer variable might hold for this selector: N of 'first/last N', the start of a
    slice 'N:' (a start-layer variable), index lists."""
    if isinstance(selector, str):
        m = re.fullmatch(r"\s*(?:first|last)\s+(\d+)\s*|\s*(-?\d+)\s*:\s*", selector)
        return [m.group(1) or m.group(2)] if m else []
    if isinstance(selector, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in selector):
        return [",".join(str(i) for i in selector), ",".join(str(i + 1) for i in selector)]
    return []


def _same_selector(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return " ".join(a.split()) == " ".join(b.split())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return False


def _unset_value(to_selector: Callable[[str], Any]) -> str | None:
    """The value ('0' or '') that this variable's mapping reads as "no selector", if it has one."""
    for candidate in ("0", ""):
        try:
            if to_selector(candidate) is None:
                return candidate
        except ValueError:
            continue
    return None


def _emit_layers(out: EnvExport, layers_env: dict[str, Callable[[str], Any]], selector: Any, num_layers: int, where: str) -> None:
    """The first (variable, value) whose mapping gives back exactly this selector; a note when none does."""
    if not layers_env:
        if not (isinstance(selector, str) and selector.strip() == "all"):
            out.notes.append(f"{where}: layers={selector!r} has no reference variable; the script decides which layers")
        return
    found = _find_layer_variable(layers_env, _layer_candidates(selector), lambda back: _same_selector(back, selector))
    try:
        resolved = parse_layers(selector, num_layers)
    except ValueError:
        resolved = None
    if found is None and resolved is not None:
        # No variable writes this selector literally ("all", "2:4"); one may still select the same layers.
        n = str(len(resolved))
        candidates = [",".join(map(str, resolved)), ",".join(str(i + 1) for i in resolved), n, str(resolved[0]) if resolved else n]
        found = _find_layer_variable(layers_env, candidates, lambda back: _resolves_to(back, num_layers, resolved))
        if found is not None:
            out.notes.append(f"{where}: layers={selector!r} written as {found[0]}={found[1]} (the same layers {resolved})")
    if found is None:
        out.notes.append(
            f"{where}: layers={selector!r} (layers {resolved}) is not expressible as {' / '.join(layers_env)}; "
            "choose layers one of these variables selects ('last N', 'first N', 'N:' or an index list, as the variable takes)"
        )
        return
    name, value = found
    _put(out, name, value, f"{where}.layers")
    # The technique's other layer variables are set to their "unset" value where one exists, so a script
    # default (say CANON_FIRST_N=2) cannot compete with the chosen one.
    for other, other_selector in layers_env.items():
        if other != name:
            unset = _unset_value(other_selector)
            if unset is not None:
                _put(out, other, unset, f"{where}.layers")


def _find_layer_variable(layers_env: dict[str, Callable[[str], Any]], candidates: list[str], accept: Callable[[Any], bool]) -> tuple[str, str] | None:
    for name, to_selector in layers_env.items():
        for candidate in candidates:
            try:
                back = to_selector(candidate)
            except ValueError:
                continue
            if back is not None and accept(back):
                return name, candidate
    return None


def _resolves_to(selector: Any, num_layers: int, layers: list[int]) -> bool:
    try:
        return parse_layers(selector, num_layers) == layers
    except ValueError:
        return False
