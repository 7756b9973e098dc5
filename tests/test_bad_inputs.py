"""The bad-input catalogue: everything a user can get wrong in a stack, its geometry, its data or its budget.

Each row is one input, the command that meets it, and the words of the one line pgolf prints for it. For
every row: exit code ≠ 0 (2 for input errors, 3 for the size cap), every stderr line starts with ``error:``,
no traceback, and nothing is written under the run directory. ``pgolf validate`` (fast: no data, no
training) catches everything a stack alone decides; ``pgolf run`` is used only for the data rows, which
fail before the run directory is created. The commands run in-process through ``pgolf_core.cli.main``.

Accepted, not an error: fewer training shards than ranks. Every rank reads the same shard stream and takes
its own span of each step's chunk, so one shard feeds any number of ranks
(``test_one_shard_feeds_more_ranks_than_shards``).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from conftest import FIXTURE_1024, FIXTURE_4096, STACKS, TOKENIZER_1024, TOKENIZER_4096
from pgolf_core import registry as registry_module
from pgolf_core.cli import main
from pgolf_core.data import HEADER_INTS, load_shard, shard_files
from pgolf.plugins.loader.sequential import DistributedTokenLoader
from pgolf_core.sample import write_shard

TINY = [
    "model.num_layers=2", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
    "data.train_seq_len=32", "data.train_batch_tokens=1024", "data.val_batch_size=8192",
    f'data.path="{FIXTURE_1024}"', f'data.tokenizer="{TOKENIZER_1024}"',
    "run.iterations=2", "run.warmup_steps=0", "run.max_wallclock_seconds=0.0", "run.val_loss_every=0", "run.grad_accum_base=2",
]

PLUGIN = '''
import attrs
from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.compressor.zlib import Zlib


@attrs.define(frozen=True, kw_only=True)
class LevelParams:
    level: int = param(6, help="zlib level")


def _zlib(name, **kw):
    return Technique(name=name, slot="compressor", params=LevelParams, build=lambda p, c: Zlib(p.level), summary="test",
                     example=f'[compressor]\\nuse = "{name}"', **kw)


@attrs.define(frozen=True, kw_only=True)
class NoParams:
    pass


class ReplacesRotary:
    """Replaces the attention part that the built-in partial_rope modifier replaces."""

    def transform(self, spec, layers, name):
        for i in layers:
            spec.replace("attention", i, "rotary", lambda host: None, by=name)


@hookimpl
def pgolf_register_techniques(register):
    register(_zlib("needs_ema", requires=("ema",)))
    register(_zlib("not_with_softcap", conflicts=("softcap",)))
    register(Technique(name="rope_variant", slot="modifier", params=NoParams, build=lambda p, c: ReplacesRotary(), summary="test",
                       example='[[modifier]]\\nuse = "rope_variant"'))
'''


def _sets(*extra: str) -> list[str]:
    out = []
    for expr in [*TINY, *extra]:
        out += ["--set", expr]
    return out


def _stack_file(tmp_path, body: str, base: str = "baseline.toml") -> str:
    path = tmp_path / "stack.toml"
    path.write_text(f'schema_version = 1\nextends = "{STACKS / base}"\n{body}')
    return str(path)


# -- data directories ---------------------------------------------------------------------------------------
def _copy_fixture(tmp_path, source=FIXTURE_1024):
    d = tmp_path / "data"
    shutil.copytree(source, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def _header_field(tmp_path, index: int, value: int):
    d = _copy_fixture(tmp_path)
    f = d / "fineweb_train_000000.bin"
    raw = bytearray(f.read_bytes())
    header = np.frombuffer(bytes(raw[: 4 * HEADER_INTS]), dtype="<i4").copy()
    header[index] = value
    raw[: 4 * HEADER_INTS] = header.tobytes()
    f.write_bytes(bytes(raw))
    return d


def _truncated(tmp_path):
    d = _copy_fixture(tmp_path)
    f = d / "fineweb_train_000001.bin"
    f.write_bytes(f.read_bytes()[:100])
    return d


def _cut_tail(tmp_path):
    d = _copy_fixture(tmp_path)
    f = d / "fineweb_val_000000.bin"
    f.write_bytes(f.read_bytes()[:-10])
    return d


def _token_too_big(tmp_path, name: str):
    d = _copy_fixture(tmp_path)
    tokens = load_shard(d / name).numpy().astype(np.int64)
    tokens[5] = 2000
    write_shard(d / name, tokens)
    return d


def _junk_tokenizer(tmp_path):
    path = tmp_path / "junk.model"
    path.write_bytes(b"not a sentencepiece model")
    return path


def _empty(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def _no_val(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "fineweb_val_000000.bin").unlink()
    return d


# Each row: id, command, how to build its arguments (from tmp_path), words the error line must contain.
VALIDATE = [
    ("toml-syntax", lambda t: [_stack_file(t, "[model\nnum_layers = 4\n")], "TOML syntax error"),
    ("unknown-key", lambda t: ["baseline", "--set", "model.layrs=4"], "model.layrs: unknown key 'layrs' (did you mean 'num_layers'?)"),
    ("unknown-table", lambda t: [_stack_file(t, '[optimiser]\nuse = "muon"\n')], "unknown table or key 'optimiser' (did you mean 'optimizer'?)"),
    ("wrong-type-int", lambda t: ["baseline", "--set", "model.num_layers=4.5"], "model.num_layers: expected int, got float 4.5"),
    ("wrong-type-bool", lambda t: ["baseline", "--set", 'model.tie_embeddings="yes"'], "model.tie_embeddings: expected bool (true/false), got str 'yes'"),
    ("wrong-type-str", lambda t: ["baseline", "--set", "run.device=3"], "run.device: expected string, got int 3"),
    ("negative-lr", lambda t: ["baseline", "--set", "optimizer.matrix_lr=-0.1"], "optimizer.matrix_lr: matrix_lr must be >= 0, got -0.1"),
    ("negative-iterations", lambda t: ["baseline", "--set", "run.iterations=-5"], "run.iterations: iterations must be >= 0, got -5"),
    ("ema-decay-1", lambda t: ["pr315", "--set", "averaging.decay=1.0"], "averaging.decay: decay must be in [0.0, 1.0), got 1.0"),
    ("stride-over-eval-len", lambda t: ["pr315", "--set", "evaluator.stride=4096"], "evaluator(sliding_window): stride=4096 is larger than eval_seq_len=2048"),
    ("rope-dims-over-head-dim", lambda t: ["pr315", "--set", "modifier[2].rope_dims=80"], "modifier[2](partial_rope): rope_dims=80 must be even and <= head dim 64"),
    ("bad-choice", lambda t: ["baseline", "--set", 'run.on_nonfinite="ignore"'], "run.on_nonfinite: on_nonfinite must be one of 'stop', 'skip', got 'ignore'"),
    ("unknown-technique", lambda t: ["baseline", "--set", 'attention.use="gqaa"'], "attention.use: no technique 'gqaa' for slot 'attention' (did you mean 'gqa'?)"),
    ("technique-in-wrong-slot", lambda t: ["baseline", "--set", 'mlp.use="xsa"'], "'xsa' is a technique for slot modifier"),
    ("duplicated-technique", lambda t: [_stack_file(t, '[[modifier]]\nuse = "xsa"\nlayers = "last 2"\n[[modifier]]\nuse = "xsa"\nlayers = [0, 8]\n')],
     "modifiers 'modifier[0](xsa)' and 'modifier[1](xsa)' both install 'xsa' at layer 8 attention site 'heads_out'; narrow 'layers' or drop one"),
    ("duplicated-table", lambda t: [_stack_file(t, '[mlp]\nuse = "relu2"\n[mlp]\nuse = "relu2"\n')], "TOML syntax error: Cannot declare ('mlp',) twice"),
    ("modifier-not-a-table", lambda t: ["baseline", "--set", "modifier=[0]"], "--set modifier=[0]: modifier[0]: expected a table like {use = \"xsa\"}, got int 0"),
    ("bad-layer-selector", lambda t: [_stack_file(t, '[[modifier]]\nuse = "xsa"\nlayers = "most"\n')], "modifier[0](xsa).layers: unknown selector 'most'"),
    ("layer-out-of-range", lambda t: [_stack_file(t, '[[modifier]]\nuse = "xsa"\nlayers = [12]\n')], "modifier[0](xsa).layers: layer 12 is outside 0..8"),
    ("missing-plugin", lambda t: [_stack_file(t, '[requires]\nplugins = ["pgolf-no-such-plugin>=0.2"]\n')],
     "plugin distribution 'pgolf-no-such-plugin' is not installed; install it: pip install 'pgolf-no-such-plugin>=0.2'"),
    ("dim-not-divisible-by-heads", lambda t: ["baseline", "--set", "model.num_heads=3"], "model.model_dim=512 is not divisible by model.num_heads=3"),
    ("heads-not-divisible-by-kv", lambda t: ["baseline", "--set", "model.num_kv_heads=3"], "model.num_heads=8 is not divisible by model.num_kv_heads=3"),
    ("odd-head-dim", lambda t: ["baseline", "--set", "model.model_dim=520"], "head dim model_dim/num_heads=65 must be even for RoPE"),
    ("batch-not-multiple-of-seq", lambda t: ["baseline", "--set", "data.train_batch_tokens=1000"], "data.train_batch_tokens=1000 is not a multiple of data.train_seq_len=1024"),
    ("batch-not-divisible-by-accum", lambda t: ["baseline", "--set", "data.train_batch_tokens=9216"],
     "data.train_batch_tokens=9216 is not divisible by world_size*grad_accum*train_seq_len=run.grad_accum_base*data.train_seq_len=8*1024"),
    ("missing-stack", lambda t: [str(t / "nope.toml")], "stack file not found"),
    ("bad-set-expression", lambda t: ["baseline", "--set", "model.num_layers"], "--set model.num_layers: expected section.key=value"),
    # numbers: NaN compares false with every bound, so it is refused by type; inf, and floats whose square overflows float32
    ("nan", lambda t: ["baseline", "--set", "optimizer.matrix_lr=nan"], "optimizer.matrix_lr: expected a finite float, got float nan"),
    ("inf", lambda t: ["baseline", "--set", "optimizer.matrix_lr=-inf"], "optimizer.matrix_lr: expected a finite float, got float -inf"),
    ("huge-float", lambda t: ["baseline", "--set", "optimizer.matrix_lr=1e308"], "optimizer.matrix_lr: float 1e+308 is out of range: floats in a stack are limited to |x| <= 1e+18"),
    ("nan-in-a-file", lambda t: [_stack_file(t, "[optimizer]\nmatrix_lr = nan\n")], "optimizer.matrix_lr: expected a finite float, got float nan"),
    ("int-beyond-64-bit", lambda t: ["baseline", "--set", f"run.iterations={2**70}"], "run.iterations: int 1180591620717411303424 is out of range: integers in a stack are 64-bit"),
    ("negative-seed", lambda t: ["baseline", "--set", "run.seed=-1"], "run.seed: seed must be >= 0, got -1"),
    ("seed-beyond-numpy", lambda t: ["baseline", "--set", "run.seed=4294967296"], "run.seed: seed must be <= 4294967295, got 4294967296"),
    ("val-batch-below-one-sequence", lambda t: ["baseline", "--set", "data.val_batch_size=1"],
     "data.val_batch_size=1 gives less than one sequence of data.train_seq_len=1024 per validation micro-batch (run.grad_accum_base=8); raise it to at least 8192"),
    ("vocab-beyond-uint16-shards", lambda t: ["baseline", "--set", "model.vocab_size=70000"], "model.vocab_size: vocab_size must be <= 65536, got 70000"),
    ("too-deep-to-build", lambda t: ["baseline", "--set", "model.num_layers=100000"], "model.num_layers: num_layers must be <= 1024, got 100000"),
    ("cannot-fit-any-process", lambda t: ["pr1392", "--set", "model.model_dim=65536"],
     "need at least 6,076.6 GiB per process (519,967,604,827 parameters: 5,811.1 GiB for weights, gradients and optimizer state; 265.5 GiB of activations and logits), more than any single process gets (4,096.0 GiB)"),
    # a run id is a name
    ("run-id-with-a-separator", lambda t: ["baseline", "--set", 'run.run_id="../x"'], "run.run_id: run_id '../x' holds '/'; use letters, digits, '-', '_' and '.'"),
    ("run-id-dot-dot", lambda t: ["baseline", "--set", 'run.run_id=".."'], "run.run_id: run_id '..' is not a name"),
    ("run-id-control-character", lambda t: ["baseline", "--set", 'run.run_id="a\\nb"'], "run.run_id: run_id 'a\\nb' holds '\\n'"),
    ("run-id-too-long", lambda t: ["baseline", "--set", f'run.run_id="{"x" * 201}"'], "is 201 bytes long; at most 200"),
    ("path-with-nul", lambda t: ["baseline", "--set", 'data.path="a\\u0000b"'], "data.path: path must not contain a NUL character"),
    # files that are not what they should be
    ("stack-not-utf8", lambda t: [_raw_file(t, b'schema_version = 1\n[meta]\nname = "\xff"\n')], "not UTF-8 text (byte 0xff at offset 34); TOML files are UTF-8"),
]


def _raw_file(tmp_path, data: bytes) -> str:
    path = tmp_path / "raw.toml"
    path.write_bytes(data)
    return str(path)

RUN_DATA = [
    ("missing-directory", lambda t: t / "nowhere", None, "directory not found"),
    ("no-shards", _empty, None, "no training shards matching fineweb_train_*.bin"),
    ("no-validation-shards", _no_val, None, "no validation shards matching fineweb_val_*.bin"),
    ("wrong-magic", lambda t: _header_field(t, 0, 1234), None, "bad magic 1234 (expected 20240520)"),
    ("wrong-version", lambda t: _header_field(t, 1, 2), None, "unsupported shard version 2 (expected 1)"),
    ("size-mismatch", lambda t: _header_field(t, 2, 99999), None, "does not match its header (99999 tokens"),
    ("truncated-shard", _truncated, None, "100 bytes is shorter than the 1024-byte shard header"),
    ("truncated-tail", _cut_tail, None, "does not match its header"),
    ("token-id-over-vocab-train", lambda t: _token_too_big(t, "fineweb_train_000000.bin"), None, "token id 2000 >= model.vocab_size 1024"),
    ("token-id-over-vocab-val", lambda t: _token_too_big(t, "fineweb_val_000000.bin"), None, "token id 2000 >= model.vocab_size 1024"),
    ("tokenizer-missing", None, lambda t: t / "missing.model", "file not found; set data.tokenizer"),
    ("tokenizer-not-a-model", None, _junk_tokenizer, "not a readable SentencePiece model"),
    ("tokenizer-vocab-mismatch", None, lambda t: TOKENIZER_4096, "has vocab_size 4096 but model.vocab_size is 1024"),
    ("sp4096-shards-sp1024-stack", lambda t: FIXTURE_4096, None, ">= model.vocab_size 1024"),
    ("shard-is-a-directory", lambda t: _shard_directory(t), None, "fineweb_train_000002.bin: not a file; a shard is a file of tokens"),
]


def _shard_directory(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "fineweb_train_000002.bin").mkdir()
    return d


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_errors(code: int, err: str, words: str, exit_code: int = 2, only_errors: bool = True) -> None:
    """``only_errors``: nothing but ``error:`` lines (a run that started also says where its directory is)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == exit_code, err
    assert errors and (not only_errors or errors == lines), err
    assert "Traceback" not in err
    assert any(words in line for line in errors), f"expected {words!r} in: {err}"


@pytest.fixture
def isolated_registry(monkeypatch):
    """A catalogue built for this test only (``--plugin`` modules loaded here do not reach other tests)."""
    monkeypatch.setattr(registry_module, "_DEFAULT", None)


@pytest.mark.parametrize("case, build, words", VALIDATE, ids=[c[0] for c in VALIDATE])
def test_validate_rejects_with_one_line(case, build, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, ["validate", *build(tmp_path)])
    _assert_one_line_errors(code, err, words)
    assert out == ""


WITH_PLUGIN = [
    ("unmet-requirement", lambda t: ["baseline", "--set", 'compressor.use="needs_ema"'],
     "technique 'needs_ema' requires 'ema', which the stack does not use; add it or drop 'needs_ema'"),
    ("declared-conflict", lambda t: ["baseline", "--set", 'compressor.use="not_with_softcap"'],
     "techniques 'not_with_softcap' and 'softcap' cannot be combined; drop one"),
    ("conflicting-modifiers", lambda t: [_stack_file(t, '[[modifier]]\nuse = "partial_rope"\nrope_dims = 8\nlayers = "last 2"\n[[modifier]]\nuse = "rope_variant"\n')],
     "modifiers 'modifier[0](partial_rope)' and 'modifier[1](rope_variant)' both replace 'rotary' on layer 7 attention; narrow 'layers' or drop one"),
]


@pytest.mark.parametrize("case, build, words", WITH_PLUGIN, ids=[c[0] for c in WITH_PLUGIN])
def test_validate_rejects_unmet_requirements_and_conflicts(case, build, words, tmp_path, capsys, isolated_registry):
    """Techniques of a local plugin (``--plugin FILE``) that declare requirements, conflicts and a clashing option."""
    plugin = tmp_path / "catalogue_plugin.py"
    plugin.write_text(PLUGIN)
    code, out, err = _cli(capsys, ["validate", *build(tmp_path), "--plugin", str(plugin)])
    _assert_one_line_errors(code, err, words)


@pytest.mark.parametrize("case, data, tokenizer, words", RUN_DATA, ids=[c[0] for c in RUN_DATA])
def test_run_rejects_bad_data_before_writing(case, data, tokenizer, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = []
    if data is not None:
        extra.append(f'data.path="{data(tmp_path)}"')
    if tokenizer is not None:
        extra.append(f'data.tokenizer="{tokenizer(tmp_path)}"')
    out_dir = tmp_path / "runs"
    code, out, err = _cli(capsys, ["run", "baseline", *_sets(*extra), "--out-dir", str(out_dir), "--run-id", "bad"])
    _assert_one_line_errors(code, err, words)
    assert not out_dir.exists(), "a run directory was created for bad data"


def test_shards_of_a_smaller_tokenizer_are_caught(tmp_path, capsys, monkeypatch):
    """sp1024 shards with the sp4096 tokenizer and model.vocab_size = 4096: every id is in range, the bytes
    per token would be wrong; the validation ids never reach the upper half of the vocabulary."""
    monkeypatch.chdir(tmp_path)
    extra = [f'data.tokenizer="{TOKENIZER_4096}"', "model.vocab_size=4096"]
    code, out, err = _cli(capsys, ["run", "baseline", *_sets(*extra), "--out-dir", str(tmp_path / "runs")])
    _assert_one_line_errors(code, err, "the shards look made with a smaller tokenizer (e.g. sp1024 shards with an sp4096 tokenizer)")
    assert "validation tokens use ids up to 1023 only" in err and not (tmp_path / "runs").exists()


def test_world_size_must_divide_grad_accum_base(tmp_path):
    """Geometry that depends on the number of processes is checked when the processes exist."""
    import os
    from unittest import mock

    from pgolf_core.errors import ConfigError
    from pgolf_core.registry import default_registry
    from pgolf_core.runtime import setup_runtime
    from conftest import tiny_stack

    stack = tiny_stack(default_registry(), "run.grad_accum_base=2")
    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "j"}
    with mock.patch.dict(os.environ, env), pytest.raises(ConfigError) as info:
        setup_runtime(stack)
    assert "world size 3 must divide run.grad_accum_base=2" in info.value.problems[0]


def test_one_shard_feeds_more_ranks_than_shards(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100))
    files = shard_files(tmp_path, "fineweb_train_*.bin", "training")
    batches = [DistributedTokenLoader(files, r, 4, torch.device("cpu")).next_batch(32, 4, 2) for r in range(4)]
    starts = [int(b.inputs[0, 0]) for b in batches]
    assert starts == [0, 5, 10, 15]  # disjoint spans of one chunk, one per rank


def test_artifact_over_the_cap_is_reported_before_any_result(tmp_path, capsys, monkeypatch):
    """The cap is on code (the packed export) + compressed model. With a cap between the model's bytes and
    the total, the model alone fits, the artifact does not; the run fails with exit 3 before the artifact,
    submission.json or any final score exists."""
    monkeypatch.chdir(tmp_path)
    argv = ["run", str(STACKS / "baseline.toml"), *_sets("run.iterations=0", "run.artifact_cap_bytes=90000"), "--out-dir", str(tmp_path / "runs"), "--run-id", "big"]
    code, out, err = _cli(capsys, argv)
    _assert_one_line_errors(code, err, "over the 90000-byte cap by", exit_code=3, only_errors=False)
    numbers = re.search(r"artifact is (\d+) bytes \(code (\d+) \+ model (\d+)\)", err)
    total, code_bytes, model_bytes = map(int, numbers.groups())
    assert total == code_bytes + model_bytes > 90_000 > model_bytes and 10_000 < code_bytes < 60_000
    runs = tmp_path / "runs"
    assert not (runs / "big").exists() and not list(runs.rglob("submission.json")) and not list(runs.rglob("*.ptz"))
    log = (runs / "big.failed" / "log.txt").read_text()
    assert "_exact val_loss" not in log and "run_failed: artifact is" in log


# Inputs that used to be found only after the run directory existed (leaving .failed and a ledger line for a run
# that never ran), and run directories that cannot be made: each is one line, and nothing is written.
RUN_EARLY = [
    ("negative-seed", ["--set", "run.seed=-1"], "run.seed: seed must be >= 0, got -1"),
    ("val-batch-below-one-sequence", ["--set", "data.val_batch_size=1"], "data.val_batch_size=1 gives less than one sequence"),
    ("run-id-path", ["--run-id", "../x"], "--run-id: run_id '../x' holds '/'"),
    ("out-dir-under-a-file", ["--out-dir", "{t}/file/runs"], "cannot create the output directory {t}/file/runs: Not a directory"),
    ("out-dir-name-too-long", ["--out-dir", "{t}/" + "d" * 300], "cannot create the output directory {t}/ddd"),
    ("more-than-this-host", ["--set", "model.model_dim=16384", "--set", "model.num_layers=64", "--set", "model.num_heads=64", "--set", "model.num_kv_heads=64"],
     "more than this host's memory gives each process"),
    ("force-without-resume", ["--force"], "--force only applies to --resume RUN_DIR"),
]


@pytest.mark.parametrize("case, extra, words", RUN_EARLY, ids=[c[0] for c in RUN_EARLY])
def test_run_rejects_before_the_run_directory_exists(case, extra, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    extra = [e.replace("{t}", str(tmp_path)) for e in extra]
    out_dir = tmp_path / "runs"
    argv = ["run", "baseline", *_sets(), "--out-dir", str(out_dir), "--run-id", "bad", *extra]
    code, out, err = _cli(capsys, argv)
    _assert_one_line_errors(code, err, words.replace("{t}", str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "something was written"


def _damaged_runs(tmp_path):
    from test_workflow_report import make_run

    def damage(name: str, fn) -> str:
        run = make_run(tmp_path, name, 1, 2.0)
        fn(run)
        return str(run)

    def write(file: str, data):
        return lambda run: (run / file).write_bytes(data if isinstance(data, bytes) else data.encode())

    return [
        (damage("summary-list", write("summary.json", "[1, 2]")), "summary.json: holds a JSON list, not an object"),
        (damage("summary-not-json", write("summary.json", '{"steps": ')), "summary.json: not valid JSON (Expecting value at line 1)"),
        (damage("summary-not-utf8", write("summary.json", b"\xff\xfe")), "summary.json: not valid JSON"),
        (damage("steps-text", write("summary.json", '{"steps": "40"}')), "summary.json: steps is not a number"),
        (damage("final-list", write("summary.json", '{"final": []}')), "summary.json: final is not a dict"),
        (damage("metrics-list", write("metrics.jsonl", "[1]\n{}\n")), "metrics.jsonl:1: not a JSON object"),
        (damage("metrics-text-loss", write("metrics.jsonl", '{"kind": "train", "step": 1, "train_loss": "6.9", "train_time_ms": 1}\n{}\n')),
         "metrics.jsonl:1: a 'train' record without a number for train_loss"),
        (damage("stack-not-toml", write("stack.toml", "[meta\n")), "stack.toml: not valid TOML"),
        (damage("submission-text", write("submission.json", '{"val_loss": "low"}')), "submission.json: val_loss is not a number"),
        (damage("final-name-list", write("metrics.jsonl", '{"kind": "final", "name": [1], "val_loss": 1, "val_bpb": 1}\n{}\n')),
         "a 'final' record without a number for name (a string)"),
    ]


def test_damaged_run_directories_are_one_line_for_report_and_compare(tmp_path, capsys):
    for run, words in _damaged_runs(tmp_path):
        for argv in (["report", run], ["compare", run, "--no-plot"]):
            code, out, err = _cli(capsys, argv)
            _assert_one_line_errors(code, err, words)
        assert not list((tmp_path).rglob(".*.tmp*"))


def test_damaged_run_keeps_report_working_when_only_its_tail_is_torn(tmp_path, capsys):
    """A killed run's metrics.jsonl may end in half a record: that line is skipped, not an error."""
    from test_workflow_report import make_run

    run = make_run(tmp_path, "torn", 1, 2.0)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    code, out, err = _cli(capsys, ["report", str(run)])
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "argv, words",
    [
        (lambda t: ["compare", "{run}", "--plot", str(t)], "--plot {t}: is a directory; give a file name"),
        (lambda t: ["compare", "{run}", "--plot", str(t / "no" / "x.png")], "--plot {t}/no/x.png: the directory {t}/no does not exist"),
        (lambda t: ["bench", "baseline", "--json", str(t)], "--json {t}: is a directory; give a file name"),
        (lambda t: ["bench-gptq", "pr1019", "--json", str(t)], "--json {t}: is a directory; give a file name"),
    ],
    ids=["plot-at-a-directory", "plot-in-a-missing-directory", "bench-json-at-a-directory", "bench-gptq-json-at-a-directory"],
)
def test_output_files_are_checked_before_any_work(argv, words, tmp_path, capsys):
    from test_workflow_report import make_run

    run = make_run(tmp_path / "runs", "r", 1, 2.0)
    args = [a.replace("{run}", str(run)) for a in argv(tmp_path)]
    code, out, err = _cli(capsys, args)
    _assert_one_line_errors(code, err, words.replace("{t}", str(tmp_path)))
