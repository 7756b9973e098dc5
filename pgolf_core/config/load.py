"""Reading a stack: TOML → ``extends`` merge → ``--set`` overrides → legacy env → strict structuring.

All problems are collected and raised together as one ``ConfigError``, one line each, naming the file,
line, key path and the fix.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import attrs

from ..errors import ConfigError
from ..hookspecs import SINGLE_SLOTS
from ..registry import Registry
from .convert import did_you_mean, structure_table
from .envvalues import env_kind, parse_env_value
from .schema import CORE_TABLES, SCHEMA_VERSION, Choice, ModifierChoice, Stack

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

TOP_LEVEL = ["schema_version", "extends", "requires", *CORE_TABLES, *SINGLE_SLOTS, "modifier"]

# Who published a recipe and what it scored belong to that file alone: a stack that extends it is another
# recipe, so it does not inherit them (a toy of the baseline is not "Baseline" at 1.2244).
IDENTITY_META = ("name", "author", "github_id", "reported_val_bpb", "reported_bytes")
# Overrides of these keys repeat a recipe (another seed, another directory, more logging) rather than
# change it; any other override makes the run a variant of its stack (see ``_variant_meta``).
NEUTRAL_KEYS = ("run.seed", "run.run_id", "run.out_dir", "run.train_log_every", "run.val_loss_every", "run.save_raw_model")


class _Source:
    """Raw text of the stack file and its bases, to point errors at lines."""

    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []  # (display path, text), child first

    def locate(self, keypath: str) -> str:
        table, _, key = keypath.rpartition(".")
        if not table:
            table, key = "", keypath
        m = re.fullmatch(r"(\w+)\[(\d+)\]", table)
        for display, text in self.files:
            line = _find_line(text, table if not m else m.group(1), key, int(m.group(2)) if m else None)
            if line:
                return f"{display}:{line}"
        return self.files[0][0] if self.files else "<stack>"


def _find_line(text: str, table: str, key: str, array_index: int | None) -> int | None:
    current, seen = "", -1
    table_line = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.fullmatch(r"\[\[\s*([\w.]+)\s*\]\]", line) or re.fullmatch(r"\[\s*([\w.]+)\s*\]", line)
        if header:
            current = header.group(1)
            if line.startswith("[[") and current == table:
                seen += 1
            if current == table and (array_index is None or seen == array_index):
                table_line = number
            continue
        in_table = current == table and (array_index is None or seen == array_index)
        if in_table and re.match(rf"{re.escape(key)}\s*=", line):
            return number
    return table_line


def _read_toml(path: Path, display: str, source: _Source, chain: list[Path]) -> dict[str, Any]:
    if not path.is_file():
        hint = " (bundled stacks: 'pgolf stacks')" if not chain else ""
        where = f"{chain[-1]}: extends " if chain else ""
        raise ConfigError(f"{where}{display}: stack file not found{hint}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{display}: cannot read the stack file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{display}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); TOML files are UTF-8, save it as UTF-8"
        ) from None
    source.files.append((display, text))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{display}: TOML syntax error: {exc}") from None
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise ConfigError(f"{display}: extends: expected a path string, got {type(base_ref).__name__}")
    base_path = _base_path(path, base_ref)
    if base_path in chain or base_path == path.resolve():
        raise ConfigError(f"{display}: extends {base_ref}: circular extends")
    base = _read_toml(base_path, _display(base_path), source, [*chain, path.resolve()])
    meta = base.get("meta")
    if isinstance(meta, dict):
        base["meta"] = {k: v for k, v in meta.items() if k not in IDENTITY_META}
    return deep_merge(base, data)


def _base_path(path: Path, base_ref: str) -> Path:
    """``extends`` is a path relative to the stack file; when no such file exists, a bundled stack's name
    (``extends = "pr1019"``) names the installed one."""
    from .bundled import bundled_stack

    relative = (path.parent / base_ref).resolve()
    if relative.is_file():
        return relative
    bundled = bundled_stack(base_ref)
    return bundled.resolve() if bundled is not None else relative


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; arrays (and everything else) in the child replace the base's."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # A slot table naming a different technique starts from scratch: the base's keys belong to
            # the base's technique.
            if "use" in value and value.get("use") != out[key].get("use"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@attrs.define(frozen=True)
class ModifierRef:
    """A modifier named in a ``--set`` path: ``modifier.xsa``, ``modifier.xsa#2`` (the second use of the name,
    counted from 1), or ``modifier(xsa)#2`` as ``pgolf config --diff`` used to print it."""

    name: str
    occurrence: int | None = None

    def __str__(self) -> str:
        return self.name + (f"#{self.occurrence}" if self.occurrence else "")


def parse_set(expr: str) -> tuple[list[str | int | ModifierRef], Any]:
    """``section.key=value`` (value as a TOML value, else a plain string) → (path parts, value).

    Modifiers are addressed by position (``modifier[5].start_step``) or by name
    (``modifier.depth_recurrence.start_step``; ``modifier.value_embedding#2.dim`` when a name repeats).
    """
    if "=" not in expr:
        raise ConfigError(f"--set {expr}: expected section.key=value")
    lhs, _, rhs = expr.partition("=")
    parts: list[str | int | ModifierRef] = []
    for token in lhs.strip().split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", token)
        named = re.fullmatch(r"modifier\((\w+)\)(?:#(\d+))?", token)
        after_modifier = parts == ["modifier"] and re.fullmatch(r"([A-Za-z_]\w*)(?:#(\d+))?", token)
        if named or after_modifier:
            found = named or after_modifier
            ref = ModifierRef(found.group(1), int(found.group(2)) if found.group(2) else None)
            if ref.occurrence == 0:
                raise ConfigError(f"--set {expr}: '{token}': uses of a modifier are counted from #1")
            parts += (["modifier"] if named else []) + [ref]
        elif m:
            parts += [m.group(1), int(m.group(2))]
        elif re.fullmatch(r"\w+", token):
            parts.append(token)
        else:
            raise ConfigError(
                f"--set {expr}: bad key path '{lhs}' (use section.key, modifier.<name>.key or modifier[0].key)"
            )
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return parts, value


def _modifier_index(data: dict[str, Any], ref: ModifierRef, expr: str) -> int:
    """The position of the modifier a name refers to in the stack (after ``extends`` and earlier ``--set``)."""
    mods = data.get("modifier")
    uses = [m.get("use") if isinstance(m, dict) else None for m in mods] if isinstance(mods, list) else []
    where = [i for i, use in enumerate(uses) if use == ref.name]
    names = [u for u in uses if isinstance(u, str)]
    if not where:
        listed = ", ".join(dict.fromkeys(names)) or "none"
        raise ConfigError(
            f"--set {expr}: the stack has no modifier '{ref.name}'{did_you_mean(ref.name, names)}; its modifiers: {listed} "
            f"(to add one, list the whole array: --set 'modifier=[...]')"
        )
    if ref.occurrence is None:
        if len(where) > 1:
            choices = " or ".join(f"modifier.{ref.name}#{k}" for k in range(1, len(where) + 1))
            raise ConfigError(f"--set {expr}: the stack uses modifier '{ref.name}' {len(where)} times; say which: {choices}")
        return where[0]
    if ref.occurrence > len(where):
        raise ConfigError(f"--set {expr}: the stack uses modifier '{ref.name}' {len(where)} time(s), there is no #{ref.occurrence}")
    return where[ref.occurrence - 1]


def _apply_set(data: dict[str, Any], expr: str) -> str:
    parts, value = parse_set(expr)
    parts = [_modifier_index(data, p, expr) if isinstance(p, ModifierRef) else p for p in parts]
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"--set {expr}: index {part} is out of range")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {expr}: '{'.'.join(map(str, parts[:i]))}' is not a table")
            if part not in node:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        raise ConfigError(f"--set {expr}: the path must end with a key")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {expr}: '{'.'.join(map(str, parts[:-1]))}' is not a table")
    node[last] = value
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in parts).replace(".[", "[")


def _env_fields(cls: type) -> dict[str, attrs.Attribute]:
    out: dict[str, attrs.Attribute] = {}
    for a in attrs.fields(cls):
        names = a.metadata.get("env") or ()
        for name in (names,) if isinstance(names, str) else names:
            out[name] = a
    return out


def _parse_env_value(raw: str, attribute: attrs.Attribute) -> Any:
    """Interpret an env string the way the reference script does for that field's type."""
    return parse_env_value(raw, env_kind(attribute.type), attribute.metadata.get("env_values"))


def _apply_legacy_env(table: dict[str, Any], cls: type, table_name: str, env: dict[str, str], log: list[str]) -> list[str]:
    problems = []
    for name, attribute in _env_fields(cls).items():
        if name not in env:
            continue
        try:
            value = _parse_env_value(env[name], attribute)
        except ValueError:
            problems.append(f"environment {name}={env[name]!r}: not a valid {attribute.type} for {table_name}.{attribute.name}")
            continue
        table[attribute.name] = value
        log.append(f"{name}={env[name]} -> {table_name}.{attribute.name} = {value!r}")
    return problems


def load_stack(
    path: str | os.PathLike[str],
    registry: Registry,
    overrides: list[str] | tuple[str, ...] = (),
    legacy_env: dict[str, str] | None = None,
    toy: list[str] | tuple[str, ...] = (),
) -> Stack:
    """Resolve a stack file into a validated ``Stack`` or raise ``ConfigError`` listing every problem.

    ``toy`` holds ``key=value`` settings from ``pgolf_core.toy`` (``--toy``), applied before ``overrides``, so a
    ``--set`` changes the toy stack; both are recorded in the resolved stack.
    """
    stack_path = Path(path)
    source = _Source()
    display = _display(stack_path) if stack_path.is_absolute() else str(path)
    data = _read_toml(stack_path, display, source, [])
    set_paths: dict[str, str] = {}
    for expr in toy:
        set_paths[_apply_set(data, expr)] = f"--toy ({expr})"
    for expr in overrides:
        set_paths[_apply_set(data, expr)] = f"--set {expr}"

    problems: list[str] = []

    def report(keypath: str, message: str) -> None:
        def covers(k: str) -> bool:  # the override set this key, or a key inside the table the problem is about
            return keypath == k or keypath.startswith((k + ".", k + "[")) or k.startswith((keypath + ".", keypath + "["))

        origin = next((e for k, e in reversed(set_paths.items()) if covers(k)), None)
        problems.append(f"{origin or source.locate(keypath)}: {keypath}: {message}")

    for key in data:
        if key not in TOP_LEVEL:
            report(key, f"unknown table or key '{key}'{did_you_mean(key, TOP_LEVEL)}")
    version = data.get("schema_version")
    if version is None:
        problems.append(f"{display}: schema_version: missing; add 'schema_version = {SCHEMA_VERSION}' at the top")
    elif version != SCHEMA_VERSION:
        report("schema_version", f"unsupported schema_version {version!r}; this pgolf reads {SCHEMA_VERSION}")
    required = _required_plugins(data.get("requires", {}), registry, report)

    env_log: list[str] = []
    core: dict[str, Any] = {}
    for name, cls in CORE_TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            report(name, f"expected a table [{name}], got {type(table).__name__}")
            continue
        table = dict(table)
        if legacy_env is not None:
            problems += _apply_legacy_env(table, cls, name, legacy_env, env_log)
        instance, found = structure_table(table, cls, name)
        for keypath, message in found:
            report(keypath, message)
        core[name] = instance

    slots: dict[str, Choice] = {}
    for slot in SINGLE_SLOTS:
        table = data.get(slot)
        if table is None:
            problems.append(f"{display}: [{slot}]: missing; choose one of: {', '.join(registry.names(slot)) or '(none installed)'}")
            continue
        choice = _structure_choice(table, slot, slot, registry, legacy_env, env_log, report)
        if choice is not None:
            slots[slot] = choice

    modifiers: list[ModifierChoice] = []
    raw_mods = data.get("modifier", [])
    if not isinstance(raw_mods, list):
        report("modifier", "expected an array of tables [[modifier]]")
        raw_mods = []
    num_layers = core["model"].num_layers if core.get("model") is not None else None
    for index, table in enumerate(raw_mods):
        if not isinstance(table, dict):
            report(f"modifier[{index}]", f"expected a table like {{use = \"xsa\"}}, got {type(table).__name__} {table!r}")
            continue
        table = dict(table)
        if legacy_env is not None and not _legacy_modifier_env(table, index, registry, legacy_env, env_log, problems, num_layers):
            continue
        layers = table.pop("layers", "all")
        choice = _structure_choice(table, "modifier", f"modifier[{index}]", registry, legacy_env, env_log, report)
        if choice is not None:
            modifiers.append(ModifierChoice(choice.technique, choice.params, layers, choice.distribution, choice.version))

    if problems:
        raise ConfigError(*problems)
    stack = Stack(
        path=display,
        schema_version=version,
        meta=core["meta"],
        run=core["run"],
        data=core["data"],
        model=core["model"],
        slots=slots,
        modifiers=tuple(modifiers),
        overrides=tuple(overrides),
        legacy_env=tuple(env_log),
        requires=tuple(required),
        toy=tuple(toy),
    )
    from .checks import check_stack  # local import: checks needs the registry and the model spec

    check_stack(stack, registry, origins=set_paths)
    if toy or overrides or env_log:
        changed = [k for k, e in set_paths.items() if e.startswith("--set")] + _env_keys(env_log)
        variant = bool(toy) or _recipe_differs(stack, stack_path, registry)
        stack = attrs.evolve(stack, meta=_variant_meta(stack.meta, changed, variant, bool(toy), display))
    return stack


def _recipe_differs(stack: Stack, path: Path, registry: Registry) -> bool:
    """Whether overrides or the legacy environment changed the recipe of the file: a resolved value other than
    the file's, outside ``meta`` and the keys that only repeat a recipe (a value restated as it was is no change).
    A file that does not resolve on its own counts as changed."""
    from .diff import flatten
    from .dump import stack_to_dict

    try:
        plain = load_stack(path, registry)
    except ConfigError:
        return True

    def recipe(st: Stack) -> dict[str, Any]:
        return {k: v for k, v in flatten(stack_to_dict(st)).items() if not k.startswith("meta.") and k not in NEUTRAL_KEYS}

    return recipe(plain) != recipe(stack) or [m.technique for m in plain.modifiers] != [m.technique for m in stack.modifiers]


def _env_keys(env_log: list[str]) -> list[str]:
    """The keys the legacy environment changed, from its log lines (``NAME=v -> optimizer(muon).matrix_lr = 0.03``)."""
    keys = []
    for line in env_log:
        m = re.search(r" -> (\S+)", line)
        if m:
            keys.append(re.sub(r"\(\w+\)", "", m.group(1)))
    return keys


def _variant_meta(meta: Any, changed: list[str], variant: bool, toy: bool, display: str) -> Any:
    """A stack changed by ``--toy``, ``--set`` or ``--legacy-env`` is not the published recipe: it is named a
    variant of it (``pr400-toy``, ``pr400-variant``) and carries no published author or score, so its
    ``submission.json`` and report cannot be mistaken for the record's. Meta keys the overrides set are kept;
    a seed, a run directory or logging alone do not make a variant."""
    if not variant:
        return meta
    recipe = [k for k in changed if k not in NEUTRAL_KEYS and not k.startswith("meta.")]
    mine = {k.removeprefix("meta.") for k in changed if k.startswith("meta.")}
    updates: dict[str, Any] = {}
    if "name" not in mine:
        updates["name"] = (meta.name or Path(display).stem) + ("-toy" if toy else "") + ("-variant" if recipe else "")
    for key, blank in (("author", ""), ("github_id", ""), ("reported_val_bpb", None), ("reported_bytes", None)):
        if key not in mine:
            updates[key] = blank
    return attrs.evolve(meta, **updates)


def _required_plugins(table: Any, registry: Registry, report) -> list[str]:
    """``[requires] plugins = [...]``: checked first, so a missing plugin reads as "install X"."""
    from .requires import check_required_plugins

    if not isinstance(table, dict):
        report("requires", "expected a table [requires] with plugins = [\"dist>=version\", ...]")
        return []
    for key in table:
        if key != "plugins":
            report(f"requires.{key}", f"unknown key '{key}'{did_you_mean(key, ['plugins'])}; valid keys: plugins")
    plugins = table.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        report("requires.plugins", "expected a list of requirement strings, e.g. [\"pgolf-xsa>=0.2\"]")
        return []
    for problem in check_required_plugins(plugins, registry):
        report("requires.plugins", problem)
    return plugins


def _legacy_modifier_env(
    table: dict, index: int, registry: Registry, env: dict[str, str], log: list[str], problems: list[str], num_layers: int | None = None
) -> bool:
    """Apply a modifier's enable switch and layer-selector env vars; False when the env turns it off."""
    name = table.get("use")
    reg = registry.get("modifier", name) if isinstance(name, str) else None
    if reg is None:
        return True
    technique = reg.technique
    if technique.enable_env and technique.enable_env in env:
        raw = env[technique.enable_env]
        try:
            on = bool(int(raw))
        except ValueError:
            problems.append(f"environment {technique.enable_env}={raw!r}: expected 0 or 1 (switches modifier[{index}]({name}))")
            return True
        if not on:
            log.append(f"{technique.enable_env}={raw} -> modifier[{index}]({name}) removed")
            return False
    for env_name, to_selector in technique.layers_env.items():
        if env_name in env:
            try:
                selector = to_selector(env[env_name])
            except ValueError:
                problems.append(f"environment {env_name}={env[env_name]!r}: not a valid layer selector for modifier[{index}]({name})")
                continue
            if selector is None:
                continue
            note = ""
            words = selector.split() if isinstance(selector, str) else []
            if num_layers and len(words) == 2 and words[0] in ("last", "first") and words[1].isdigit() and int(words[1]) > num_layers:
                # The references slice their layer list: XSA_LAST_N=11 on a 5-layer model is every layer.
                selector, note = f"{words[0]} {num_layers}", f" ({words[1]} > {num_layers} layers: every layer, as the reference reads it)"
            current = table.get("layers", "all")
            if num_layers and _same_layers(current, selector, num_layers):
                # The variable selects the layers the file's selector already does ('all' read back from
                # XSA_LAST_N=11): the file's spelling is kept, so its own environment resolves to the same stack.
                selector, note = current, (f"{note[:-1]}; " if note else " (") + f"the same layers as the file's {current!r})"
            table["layers"] = selector
            log.append(f"{env_name}={env[env_name]} -> modifier[{index}]({name}).layers = {table['layers']!r}{note}")
    return True


def _same_layers(a: Any, b: Any, num_layers: int) -> bool:
    from .checks import parse_layers

    try:
        return parse_layers(a, num_layers) == parse_layers(b, num_layers)
    except (ValueError, TypeError):
        return False


def _structure_choice(table: Any, slot: str, where: str, registry: Registry, legacy_env, env_log, report) -> Choice | None:
    if not isinstance(table, dict):
        report(where, f"expected a table with 'use = \"<technique>\"', got {type(table).__name__}")
        return None
    table = dict(table)
    name = table.pop("use", None)
    installed = registry.names(slot)
    if name is None:
        report(where, f"missing 'use'; choose one of: {', '.join(installed) or '(none installed)'}")
        return None
    if not isinstance(name, str):
        report(f"{where}.use", f"expected a technique name string, got {type(name).__name__}")
        return None
    registration = registry.get(slot, name)
    if registration is None:
        elsewhere = [r.technique.slot for r in registry.find(name)]
        extra = f"; '{name}' is a technique for slot {', '.join(elsewhere)}" if elsewhere else ""
        failed = [f.distribution for f in registry.failures]
        extra += f"; plugins that failed to load: {', '.join(failed)} (see 'pgolf list')" if failed else ""
        report(
            f"{where}.use",
            f"no technique '{name}' for slot '{slot}'{did_you_mean(name, installed)}; installed: "
            f"{', '.join(installed) or '(none)'}{extra} (see 'pgolf list --slot {slot}')",
        )
        return None
    technique = registration.technique
    if legacy_env is not None:
        for problem in _apply_legacy_env(table, technique.params, f"{where}({name})", legacy_env, env_log):
            report(f"{where}", problem)
    params, found = structure_table(table, technique.params, where)
    for keypath, message in found:
        report(keypath, message)
    if params is None:
        return None
    return Choice(name, params, registration.distribution, registration.version)
