"""Stack files: strict types, unknown keys, extends, --set, legacy env, cross-field checks, resolved TOML."""

from __future__ import annotations

import pytest

from conftest import STACKS, run_cli, tiny_stack
from pgolf_core.config import load_stack
from pgolf_core.config.checks import parse_layers
from pgolf_core.config.dump import stack_to_toml
from pgolf_core.errors import ConfigError

BAD = """schema_version = 1
extends = "{base}"

[model]
layrs = 4
num_heads = 1.7

[optimizer]
use = "muon"
matrix_lr = "fast"

[attention]
use = "gqaa"

[run]
compile = "maybe"
save_raw_model = "no"
"""


def _problems(registry, path, **kw):
    with pytest.raises(ConfigError) as info:
        load_stack(path, registry, **kw)
    return info.value.problems


def test_every_problem_reported_once_with_file_line_and_key(registry, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD.format(base=STACKS / "baseline.toml"))
    problems = _problems(registry, path)
    text = "\n".join(problems)
    assert len(problems) == 6
    assert f"{path}:5: model.layrs: unknown key 'layrs' (did you mean 'num_layers'?)" in text
    assert f"{path}:6: model.num_heads: expected int, got float 1.7" in text
    assert f"{path}:10: optimizer.matrix_lr: expected float, got str 'fast'" in text
    assert f"{path}:13: attention.use: no technique 'gqaa' for slot 'attention' (did you mean 'gqa'?); installed: gqa" in text
    assert f"{path}:16: run.compile: compile must be one of 'auto', 'on', 'off', got 'maybe'" in text
    assert f"{path}:17: run.save_raw_model: expected bool (true/false), got str 'no'" in text


def test_cli_prints_one_line_per_problem_exit_2_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD.format(base=STACKS / "baseline.toml"))
    proc = run_cli(["validate", str(path)], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_toml_syntax_error_names_line_and_column(registry, tmp_path):
    path = tmp_path / "syntax.toml"
    path.write_text("schema_version = 1\n[model\nx = 1\n")
    (problem,) = _problems(registry, path)
    assert "TOML syntax error" in problem and "line 2, column 7" in problem


def test_missing_stack_and_missing_base(registry, tmp_path):
    assert "stack file not found" in _problems(registry, tmp_path / "nope.toml")[0]
    child = tmp_path / "child.toml"
    child.write_text('schema_version = 1\nextends = "missing.toml"\n')
    assert "missing.toml: stack file not found" in _problems(registry, child)[0]


def test_schema_version_required_and_checked(registry, tmp_path):
    path = tmp_path / "v.toml"
    path.write_text((STACKS / "baseline.toml").read_text().replace("schema_version = 1", ""))
    assert any("schema_version: missing" in p for p in _problems(registry, path))
    path.write_text(f'schema_version = 99\nextends = "{STACKS / "baseline.toml"}"\n')
    assert any("unsupported schema_version 99" in p for p in _problems(registry, path))


def test_extends_merges_tables_and_a_new_technique_resets_its_table(registry, tmp_path):
    path = tmp_path / "child.toml"
    path.write_text(
        f'schema_version = 1\nextends = "{STACKS / "baseline.toml"}"\n'
        "[optimizer]\nmatrix_lr = 0.02\n"
        '[compressor]\nuse = "zstd"\n'
    )
    stack = load_stack(path, registry)
    assert stack.params("optimizer").matrix_lr == 0.02
    assert stack.params("optimizer").scalar_lr == 0.04  # inherited
    assert stack.technique("compressor") == "zstd"
    assert stack.params("compressor").level == 22  # zlib's level = 9 did not leak into zstd


def test_set_overrides_parse_toml_values_and_are_recorded(registry):
    stack = tiny_stack(registry, "optimizer.matrix_lr=0.5", "meta.name=ablation", "run.compile='off'")
    assert stack.params("optimizer").matrix_lr == 0.5
    assert stack.meta.name == "ablation"
    assert "--set optimizer.matrix_lr=0.5" in stack_to_toml(stack)


def test_set_problem_names_the_override(registry):
    with pytest.raises(ConfigError) as info:
        tiny_stack(registry, "optimizer.lr=3")
    assert info.value.problems[0].startswith("--set optimizer.lr=3: optimizer.lr: unknown key 'lr'")


def test_int_accepted_for_float_but_not_the_reverse(registry):
    assert tiny_stack(registry, "optimizer.matrix_lr=1").params("optimizer").matrix_lr == 1.0
    with pytest.raises(ConfigError, match="model.num_layers: expected int, got float 4.0"):
        tiny_stack(registry, "model.num_layers=4.0")
    with pytest.raises(ConfigError, match="expected bool"):
        tiny_stack(registry, "model.tie_embeddings=1")


def test_legacy_env_applies_declared_names_only_with_the_flag(registry):
    env = {"NUM_LAYERS": "5", "MLP_MULT": "3", "MATRIX_LR": "0.02", "WARMDOWN_ITERS": "7", "TRIGRAM": "0", "SEED": "42"}
    stack = load_stack(STACKS / "baseline.toml", registry, legacy_env=env)
    assert stack.model.num_layers == 5
    assert stack.params("mlp").mult == 3.0
    assert stack.params("optimizer").matrix_lr == 0.02
    assert stack.params("schedule").warmdown_iters == 7
    assert stack.run.seed == 42
    assert "NUM_LAYERS=5 -> model.num_layers = 5" in stack.legacy_env
    plain = load_stack(STACKS / "baseline.toml", registry)
    assert plain.model.num_layers == 9 and plain.legacy_env == ()


def test_legacy_env_bad_value_is_named(registry):
    with pytest.raises(ConfigError, match="environment NUM_LAYERS='four'"):
        load_stack(STACKS / "baseline.toml", registry, legacy_env={"NUM_LAYERS": "four"})


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_heads=3", "model.model_dim=64 is not divisible by model.num_heads=3"),
        ("model.num_kv_heads=3", "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
        ("model.model_dim=68", "head dim model_dim/num_heads=17"),
        ("optimizer.matrix_lr=-0.1", "matrix_lr must be >= 0"),
        ("data.train_batch_tokens=100", "not a multiple of data.train_seq_len"),
        ("compressor.level=12", "level must be in [0, 9]"),
    ],
)
def test_out_of_range_and_geometry(registry, override, message):
    with pytest.raises(ConfigError) as info:
        tiny_stack(registry, override)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_unknown_top_level_table(registry, tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(f'schema_version = 1\nextends = "{STACKS / "baseline.toml"}"\n[optimiser]\nuse = "muon"\n')
    assert any("unknown table or key 'optimiser' (did you mean 'optimizer'?)" in p for p in _problems(registry, path))


def test_resolved_toml_loads_back_to_the_same_stack(registry, tmp_path):
    stack = tiny_stack(registry, "optimizer.matrix_lr=0.5")
    path = tmp_path / "resolved.toml"
    path.write_text(stack_to_toml(stack))
    again = load_stack(path, registry)
    for name in ("meta", "run", "data", "model"):
        assert getattr(again, name) == getattr(stack, name)
    assert again.slots == stack.slots


@pytest.mark.parametrize(
    "selector, expected",
    [("all", [0, 1, 2, 3, 4]), ("last 2", [3, 4]), ("first 2", [0, 1]), ("last 5", [0, 1, 2, 3, 4]), ("-2:", [3, 4]), ("1:3", [1, 2]),
     ("0:5", [0, 1, 2, 3, 4]), ("-5:", [0, 1, 2, 3, 4]), ([0, -1], [0, 4])],
)
def test_layer_selectors(selector, expected):
    assert parse_layers(selector, 5) == expected


@pytest.mark.parametrize(
    "selector, reason",
    [("most", "unknown selector"), ([7], "outside 0..4"), ("last x", "unknown selector"), (["1"], "must hold ints"),
     ("last 0", "selects no layer"), ("first 0", "selects no layer"), ("4:2", "selects no layer"), ("5:", "selects no layer"), ([], "selects no layer"),
     ("last 11", "asks for 11 layers but the model has 5"), ("first 6", "asks for 6 layers"), ("0:7", "names layer 7"), ("-6:", "names layer -6")],
)
def test_bad_layer_selectors(selector, reason):
    """A selector that picks nothing, or layers the model does not have, is an error rather than a quiet no-op or clamp."""
    with pytest.raises(ValueError, match=reason):
        parse_layers(selector, 5)
