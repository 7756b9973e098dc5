"""Discovery: ``pgolf config --diff`` (the ablation view) and ``pgolf schema`` (for editors)."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
from conftest import REPO, STACKS

from pgolf_core.cli import main
from pgolf_core.registry import default_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE_STACK = REPO / "examples" / "pgolf-example-plugin" / "stacks" / "sample_leaky.toml"


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_diff_shows_only_resolved_values_that_differ(tmp_path, capsys):
    child = tmp_path / "ablation.toml"
    child.write_text(
        f'schema_version = 1\nextends = "{STACKS / "sample.toml"}"\n'
        "[optimizer]\nmatrix_lr = 0.04\n"  # restates the inherited value: not a difference
        '[model]\nnum_layers = 5\n[compressor]\nuse = "zstd"\n'
    )
    out = _run(capsys, "config", str(child), "--diff", str(STACKS / "sample.toml"), "--set", "optimizer.scalar_lr=0.02")
    lines = out.splitlines()
    assert lines[0].startswith("# ") and lines[0].endswith("sample.toml: 5 resolved key(s) differ (old -> new)")
    assert lines[1:] == [
        'meta.name: "sample" -> "ablation-variant"',  # not inherited; the --set makes a variant of the file
        "model.num_layers: 4 -> 5", "optimizer.scalar_lr: 0.04 -> 0.02", 'compressor.use: "zlib" -> "zstd"', "compressor.level: 9 -> 22",
    ]


def test_diff_of_a_stack_with_itself_is_empty_and_json_lists_rows(capsys):
    out = _run(capsys, "config", "sample", "--diff", "sample")
    assert out.splitlines()[0].endswith("0 resolved key(s) differ (old -> new)") and len(out.splitlines()) == 1
    data = json.loads(_run(capsys, "config", "sample", "--diff", "baseline", "--format", "json"))
    rows = {r["key"]: (r["old"], r["new"]) for r in data["differences"]}
    assert rows["model.num_layers"] == (9, 4) and rows["data.path"][1] == "sample:sp1024"


def test_diff_names_technique_changes_and_keys_only_one_side_has(capsys):
    out = _run(capsys, "config", str(EXAMPLE_STACK), "--diff", str(STACKS / "sample.toml"))
    assert 'mlp.use: "relu2" -> "leaky_relu2"' in out
    assert "mlp.negative_slope: 0.0 -> 0.5" in out  # both MLPs have the key (relu2's LeakyReLU option, PR #1319)
    assert 'requires.plugins: (unset) -> ["pgolf-example-plugin>=0.1"]' in out


@pytest.fixture(scope="module")
def schema():
    return json.loads(_schema_text())


def _schema_text() -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["schema"]) == 0
    return buf.getvalue()


def test_schema_is_valid_json_schema_with_every_installed_technique(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    for reg in default_registry().all():
        t = reg.technique
        options = props["modifier"]["items"]["oneOf"] if t.slot == "modifier" else props[t.slot]["oneOf"]
        (option,) = [o for o in options if "properties" in o and o["properties"]["use"]["const"] == t.name]
        assert set(option["properties"]) >= {"use", *(a.name for a in __import__("attrs").fields(t.params))}
    muon = next(o for o in props["optimizer"]["oneOf"] if o["properties"]["use"]["const"] == "muon")
    assert muon["properties"]["matrix_lr"] == {"type": "number", "description": "Muon LR of 2-D block weights", "default": 0.04}
    assert props["run"]["properties"]["seed"]["type"] == "integer"


@pytest.mark.parametrize("path", [*sorted(STACKS.glob("*.toml")), EXAMPLE_STACK], ids=lambda p: p.stem)
def test_shipped_stacks_validate_against_the_schema(schema, path):
    jsonschema.validate(tomllib.loads(path.read_text()), schema)


def test_a_child_stack_may_set_parameters_of_an_inherited_technique(schema):
    jsonschema.validate({"schema_version": 1, "extends": "pr1019.toml", "quantizer": {"prune": "int"}}, schema)
    with pytest.raises(jsonschema.ValidationError):  # with a 'use', the technique's own keys are checked
        jsonschema.validate({"schema_version": 1, "quantizer": {"use": "gptq", "prunes": "int"}}, schema)


@pytest.mark.parametrize(
    "stack",
    [
        {"optimizer": {"use": "muon", "matrix_lr": "fast"}},
        {"optimizer": {"use": "muon", "lr": 0.1}},
        {"optimizer": {"use": "muonn"}},
        {"model": {"layrs": 4}},
        {"modifier": [{"use": "relu2"}]},
        {"optimiser": {"use": "muon"}},
    ],
    ids=["wrong-type", "unknown-key", "unknown-technique", "unknown-core-key", "not-a-modifier", "unknown-table"],
)
def test_schema_rejects_what_pgolf_rejects(schema, stack):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema_version": 1, **stack}, schema)


def test_diff_matches_modifiers_by_name_and_reports_their_order(tmp_path, capsys):
    def stack(name: str, modifiers: str):
        path = tmp_path / f"{name}.toml"
        path.write_text(f'schema_version = 1\nextends = "{STACKS / "sample.toml"}"\n{modifiers}')
        return str(path)

    old = stack("old", '[[modifier]]\nuse = "xsa"\nlayers = "last 2"\n[[modifier]]\nuse = "ln_scale"\n')
    new = stack("new", '[[modifier]]\nuse = "smeargate"\n[[modifier]]\nuse = "ln_scale"\n[[modifier]]\nuse = "xsa"\nlayers = "last 3"\n')
    lines = _run(capsys, "config", new, "--diff", old).splitlines()[1:]
    assert 'modifier.smeargate.use: (unset) -> "smeargate"' in lines
    assert 'modifier.xsa.layers: "last 2" -> "last 3"' in lines
    assert 'modifier order: ["xsa", "ln_scale"] -> ["smeargate", "ln_scale", "xsa"]' in lines
    assert not any(line.startswith("modifier.ln_scale") for line in lines)  # same settings, only moved
