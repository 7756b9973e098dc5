"""Property: whatever a user writes, ``pgolf validate`` says "ok" or prints one ``error:`` line per problem.

Random edits of a stack (keys from the schema with values of random types, random technique names, random
layer selectors, random ``--set`` expressions, random deletions) must never escape as a traceback or an
internal error (exit 1). The CLI runs in-process; examples are capped to keep the suite fast.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys

import attrs
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import STACKS
from pgolf_core.cli import main
from pgolf_core.config import load_stack
from pgolf_core.config.load import TOP_LEVEL
from pgolf_core.errors import ConfigError
from pgolf_core.config.schema import CORE_TABLES
from pgolf_core.hookspecs import SINGLE_SLOTS
from pgolf_core.registry import default_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASE = tomllib.loads((STACKS / "sample.toml").read_text())
BASE.pop("extends", None)
REGISTRY = default_registry()
TECHNIQUES = sorted({r.technique.name for r in REGISTRY.all()})
MODIFIERS = REGISTRY.names("modifier")
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _schema_keys() -> dict[str, list[str]]:
    """Every key a stack may hold, by table: core tables and each slot's techniques' parameters."""
    keys = {name: [a.name for a in attrs.fields(cls)] for name, cls in CORE_TABLES.items()}
    for slot in SINGLE_SLOTS:
        names = {"use"}
        for name in REGISTRY.names(slot):
            names |= {a.name for a in attrs.fields(REGISTRY.get(slot, name).technique.params)}
        keys[slot] = sorted(names)
    keys["modifier"] = sorted({"use", "layers"} | {a.name for n in MODIFIERS for a in attrs.fields(REGISTRY.get("modifier", n).technique.params)})
    return keys


KEYS = _schema_keys()
# Sizes stay small enough that a model of them builds on the meta device in milliseconds.
small_ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 2, 64, 128, 1024, 4096]))
floats = st.one_of(st.floats(-10, 10, allow_nan=False), st.sampled_from([0.0, 1.0, 1.5, -0.5, 1e-8, math.inf, -math.inf, math.nan]))
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_:- 0123456789", max_size=12)
selectors = st.one_of(
    st.sampled_from(["all", "last 2", "first 1", "-2:", "1:3", "last 0", "first 99", ":", "most", "last -1", "2:1", "x:y"]),
    st.lists(st.integers(-12, 12), max_size=4),
    words,
)
values = st.one_of(
    small_ints, floats, st.booleans(), words, st.sampled_from(TECHNIQUES), selectors,
    st.lists(small_ints, max_size=3), st.dictionaries(words, small_ints, max_size=2),
)


def _toml_value(value) -> str:
    """A value as a user types it after ``=``: inline TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
    return str(value)


@st.composite
def set_expressions(draw) -> str:
    table = draw(st.sampled_from([*KEYS, *TOP_LEVEL, "modifier[0]", "modifier[3]", "nosuch"]))
    key = draw(st.one_of(st.sampled_from(KEYS.get(table.split("[")[0], ["x"])), words.filter(lambda w: w.isidentifier())))
    if draw(st.booleans()):
        rhs = _toml_value(draw(values))
    else:
        rhs = draw(st.text(max_size=10))  # anything at all: not TOML means a plain string
    path = f"{table}.{key}" if draw(st.integers(0, 9)) else draw(st.sampled_from([table, f"{table}..{key}", f"{table}.[1]", "=", ""]))
    return f"{path}={rhs}"


@st.composite
def stack_edits(draw) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "set", "use", "delete", "modifiers"]))
        table = draw(st.sampled_from(sorted(KEYS)))
        if action == "set" and table != "modifier":
            data.setdefault(table, {})
            if isinstance(data[table], dict):
                data[table][draw(st.sampled_from(KEYS[table]))] = draw(values)
        elif action == "use" and table in SINGLE_SLOTS:
            data[table] = {"use": draw(st.one_of(st.sampled_from(TECHNIQUES), words))}
        elif action == "delete":
            target = data.get(table)
            if isinstance(target, dict) and target and draw(st.booleans()):
                target.pop(draw(st.sampled_from(sorted(target))))
            else:
                data.pop(table, None)
        else:
            data["modifier"] = [
                {"use": draw(st.one_of(st.sampled_from(MODIFIERS), words)), "layers": draw(selectors)}
                for _ in range(draw(st.integers(0, 3)))
            ]
    return data


def _validate(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", *argv])
    return code, out.getvalue(), err.getvalue()


def _assert_ok_or_one_line_errors(code: int, out: str, err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        assert ": ok" in out and err == ""
        return
    assert code in (2, 3), (code, err)
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err


@SETTINGS
@given(exprs=st.lists(set_expressions(), min_size=1, max_size=4))
def test_random_set_expressions(exprs):
    argv = [str(STACKS / "sample.toml")]
    for expr in exprs:
        argv += ["--set", expr]
    _assert_ok_or_one_line_errors(*_validate(argv))


@SETTINGS
@given(data=stack_edits())
def test_random_stack_edits(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("edit") / "stack.toml"
    try:
        path.write_text(tomli_w.dumps(data))
    except (TypeError, ValueError):  # a value TOML cannot hold (tomli_w refuses); not a stack anyone can write
        return
    _assert_ok_or_one_line_errors(*_validate([str(path)]))


@SETTINGS
@given(slot=st.sampled_from(SINGLE_SLOTS), name=st.one_of(st.sampled_from(TECHNIQUES), words), extra=st.lists(set_expressions(), max_size=2))
def test_random_technique_choices(slot, name, extra):
    argv = [str(STACKS / "baseline.toml"), "--set", f"{slot}.use={_toml_value(name)}"]
    for expr in extra:
        argv += ["--set", expr]
    _assert_ok_or_one_line_errors(*_validate(argv))


@SETTINGS
@given(mods=st.lists(st.tuples(st.sampled_from(MODIFIERS), selectors), min_size=1, max_size=3), layers=st.integers(1, 6))
def test_random_modifiers_and_layer_selectors(mods, layers, tmp_path_factory):
    path = tmp_path_factory.mktemp("mods") / "stack.toml"
    body = "".join(f"[[modifier]]\nuse = {_toml_value(m)}\nlayers = {_toml_value(sel)}\n" for m, sel in mods)
    path.write_text(f'schema_version = 1\nextends = "{STACKS / "sample.toml"}"\n[model]\nnum_layers = {layers}\n{body}')
    _assert_ok_or_one_line_errors(*_validate([str(path)]))


@pytest.mark.parametrize(
    "expr",
    [
        "model=3", "run.seed", "modifier[0].use=1", "meta.name=[1, {a = 2}]", "run.seed=9999999999999999999999",
        "schema_version.x=", "model.num_layers.x=1", "meta=[\n    0,\n]", "modifier[0]=1", "run.seed=nan",
    ],
)
def test_known_tricky_set_expressions(expr):
    _assert_ok_or_one_line_errors(*_validate([str(STACKS / "sample.toml"), "--set", expr]))


# -- what a run writes reads back ---------------------------------------------------------------------------
STRING_FIELDS = sorted(
    [f"{table}.{a.name}" for table, cls in CORE_TABLES.items() for a in attrs.fields(cls) if a.type in (str, "str")]
    + [f"{slot}.{a.name}" for slot in SINGLE_SLOTS for a in attrs.fields(type(load_stack(STACKS / "sample.toml", REGISTRY).params(slot)))
       if a.type in (str, "str") and slot in BASE]
)


def _reads_back(stack, tmp_path) -> None:
    from pgolf_core.config.dump import stack_to_dict, stack_to_toml

    path = tmp_path / "stack.toml"
    path.write_bytes(stack_to_toml(stack).encode("utf-8"))  # what every run writes into its directory
    back = load_stack(path, REGISTRY)
    assert stack_to_dict(back) == stack_to_dict(stack)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(STRING_FIELDS), st.text(max_size=24), max_size=4), raw=st.lists(st.text(max_size=16), max_size=2))
def test_a_stack_pgolf_writes_can_always_be_read_back(values, raw, tmp_path_factory):
    """Arbitrary text (control characters, quotes, newlines, lone surrogates from undecodable command lines) in
    every string field, as TOML and as a raw ``--set`` value: either refused with one line, or written into a
    ``stack.toml`` that loads back to the same stack."""
    overrides = [f"{key}={_toml_value(value)}" for key, value in values.items() if value.encode("utf-8", "surrogatepass")]
    overrides = [o for o in overrides if _encodable(o)] + [f"meta.description={text}" for text in raw]
    try:
        stack = load_stack(STACKS / "sample.toml", REGISTRY, overrides=overrides)
    except ConfigError:
        return
    _reads_back(stack, tmp_path_factory.mktemp("back"))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_odd_paths_and_overrides_read_back(tmp_path):
    odd = tmp_path / "we\nird \udcff.toml"
    odd.write_bytes((STACKS / "sample.toml").read_bytes().replace(b'extends = "', b'extends = "' + str(STACKS).encode() + b"/"))
    stack = load_stack(odd, REGISTRY, overrides=["meta.name=a\nb", 'meta.author="x\\u0000y"'])
    assert stack.meta.name == "a\nb" and stack.meta.author == "x\x00y"
    _reads_back(stack, tmp_path)
    with pytest.raises(ConfigError, match="meta.name: expected UTF-8 text, got str 'a\\\\udcffb'"):
        load_stack(STACKS / "sample.toml", REGISTRY, overrides=["meta.name=a\udcffb"])
