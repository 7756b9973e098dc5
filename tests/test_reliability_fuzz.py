"""A bounded fuzz harness: command lines, environment variables and damaged run directories.

Property, for every example: pgolf either works, or answers with ``error:`` lines and exit 2 (3/4/5 where
those codes apply; argparse's own usage errors exit 2 too); never a traceback, never an "internal error",
never a half-written file (no temporary file left behind, every ledger line whole, no run directory left
``.partial`` or locked once the command returned). Everything runs in-process through
``pgolf_core.cli.main`` on the small fixture of ``test_reliability.py``; examples are capped (about 30 s in all).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import STACKS
from pgolf_core import registry as registry_module
from pgolf_core.cli import main
from pgolf_core.ledger import read as read_ledger
from test_reliability import _tiny, small_data, straight  # noqa: F401 (fixtures)

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
USER_CODES = {2, 3, 4, 5}

nasty = st.one_of(
    st.sampled_from(["", "-", ".", "..", "/", "x/y", "-x", "nan", "inf", "1e308", "-1", "0", "2", "99999999999999999999", "true",
                     "[1, {a = 2}]", '"quoted"', "a\nb", "\udcff", "sample", "baseline", "r.partial", "r.failed-00ff", " "]),
    st.text(max_size=8),
)
SET_KEYS = ["run.seed", "run.iterations", "run.run_id", "run.out_dir", "run.val_loss_every", "run.on_nonfinite", "run.device",
            "data.val_batch_size", "data.train_seq_len", "data.path", "model.num_layers", "model.model_dim", "model.vocab_size",
            "optimizer.matrix_lr", "schedule.warmdown_iters", "meta.name", "evaluator.use", "modifier[0].use", "nosuch.key"]
ENV_KEYS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PGOLF_LEDGER", "PGOLF_RUN_ID", "PGOLF_FAULT",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "NUM_LAYERS", "MATRIX_LR", "SEED"]
# Never torchrun's own markers (TORCHELASTIC_RUN_ID, LOCAL_WORLD_SIZE): with them a valid RANK/WORLD_SIZE pair would
# really wait for its peers, as it must under torchrun.
FAULTS = ["nan:step=1", "nan:step=2", "nan", "exit", "boom:step=1", "nan:step=x", ""]  # never exit:step=N: it ends the process


def _set(key: str, value: str) -> str:
    return f"{key}={value}"


@st.composite
def run_args(draw) -> list[str]:
    args: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        args += ["--set", _set(draw(st.sampled_from(SET_KEYS)), draw(nasty))]
    if draw(st.booleans()):
        args += ["--run-id", draw(nasty)]
    if draw(st.integers(0, 3)) == 0:
        args += ["--checkpoint-every", draw(st.sampled_from(["-1", "0", "1", "x"]))]
    if draw(st.integers(0, 4)) == 0:
        args += ["--resume", draw(st.sampled_from(["runs/r.partial", "runs", "runs/ledger.jsonl", "nowhere", "runs/r"]))]
    if draw(st.integers(0, 4)) == 0:
        args.append("--force")
    if draw(st.integers(0, 4)) == 0:
        args += ["--nproc-per-node", draw(st.sampled_from(["0", "x", "1", "auto", "-3"]))]
    if draw(st.integers(0, 5)) == 0:
        args.append("--legacy-env")
    return args


@st.composite
def environments(draw) -> dict[str, str]:
    env = {}
    for key in draw(st.lists(st.sampled_from(ENV_KEYS), max_size=3, unique=True)):
        env[key] = draw(st.sampled_from(FAULTS)) if key == "PGOLF_FAULT" else draw(nasty)
    return {k: v for k, v in env.items() if "\x00" not in v and "\udcff" not in v}


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors: "pgolf run: error: ..." and exit 2
            code = exc.code if isinstance(exc.code, int) else 2
            assert code == 2 and "error:" in err.getvalue(), (argv, err.getvalue())
            return code, out.getvalue(), ""
    return code, out.getvalue(), err.getvalue()


def _assert_clean(code: int, err: str, root: Path) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    assert code == 0 or code in USER_CODES or code == 1 and "NOT SIGNIFICANT" in err, (code, err)
    if code != 0 and err:
        assert any(line.startswith("error: ") for line in err.splitlines()), err
    assert not [p for p in root.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.lock")), "a run directory was left open or locked"
    for ledger in root.rglob("ledger.jsonl"):
        records, bad = read_ledger(ledger)
        assert bad == 0, ledger.read_bytes()[-500:]


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """The environment, the working directory and the catalogue restored after the examples."""
    saved = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGOLF_PROGRESS", "0")
    yield
    os.environ.clear()
    os.environ.update(saved)
    registry_module._DEFAULT = None


@settings(max_examples=25, **SETTINGS)
@given(args=run_args(), env=environments())
def test_fuzz_pgolf_run(small_data, tmp_path_factory, isolated, args, env):
    root = tmp_path_factory.mktemp("fuzz")
    os.chdir(root)
    (root / "runs").mkdir()
    (root / "runs" / "ledger.jsonl").write_text("")
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update(env)
    argv = ["run", str(STACKS / "baseline.toml"), "--out-dir", "runs"]
    for expr in [*_tiny(small_data), "run.iterations=2", "run.val_loss_every=0"]:
        argv += ["--set", expr]
    code, _, err = _call(argv + args)
    _assert_clean(code, err, root)


COMMANDS = [
    lambda: ["validate", "sample"], lambda: ["config", "sample"], lambda: ["config", "sample", "--format", "json"],
    lambda: ["config", "sample", "--diff", "baseline"], lambda: ["config", "sample", "--as-env"], lambda: ["ledger"],
    lambda: ["ledger", "--json"], lambda: ["list"], lambda: ["show", "muon"], lambda: ["stacks"],
]


@settings(max_examples=40, **SETTINGS)
@given(command=st.sampled_from(COMMANDS), sets=st.lists(st.tuples(st.sampled_from(SET_KEYS), nasty), max_size=3), extra=st.lists(nasty, max_size=2),
       env=environments())
def test_fuzz_other_commands(tmp_path_factory, isolated, command, sets, extra, env):
    root = tmp_path_factory.mktemp("cmd")
    os.chdir(root)
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update(env)
    argv = command()
    if argv[0] in ("validate", "config"):
        for key, value in sets:
            argv += ["--set", _set(key, value)]
    code, _, err = _call(argv + [e for e in extra if e.startswith("-")])
    _assert_clean(code, err, root)


# -- damaged run directories ----------------------------------------------------------------------------------
FILES = ["summary.json", "submission.json", "metrics.jsonl", "stack.toml", "log.txt", "report.md", "final_model.int8.ptz"]
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


@st.composite
def damages(draw) -> list[tuple]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "bytes", "delete", "directory", "json-key", "append-line"]))
        out.append((kind, draw(st.sampled_from(FILES)), draw(st.integers(0, 400)), draw(st.binary(max_size=40)), draw(json_values),
                    draw(st.sampled_from(["steps", "final", "seed", "val_loss", "run_id", "score_line", "compliant", "quantizer_compliance"]))))
    return out


def _damage(run: Path, damage: list[tuple]) -> None:
    for kind, name, offset, blob, value, key in damage:
        path = run / name
        if path.is_dir():
            continue
        if kind == "truncate" and path.exists():
            path.write_bytes(path.read_bytes()[:offset])
        elif kind == "bytes":
            path.write_bytes(blob)
        elif kind == "delete" and path.exists():
            path.unlink()
        elif kind == "directory":
            path.unlink(missing_ok=True)
            path.mkdir()
        elif kind == "json-key" and name.endswith(".json") and path.exists():
            try:
                data = json.loads(path.read_bytes())
            except ValueError:
                continue
            if isinstance(data, dict):
                data[key] = value
                path.write_text(json.dumps(data))
        elif kind == "append-line":
            with open(path, "ab") as f:
                f.write(json.dumps(value).encode() + b"\n")


@settings(max_examples=25, **SETTINGS)
@given(damage=damages(), command=st.sampled_from(["report", "compare", "significance", "ledger"]))
def test_fuzz_damaged_run_directories(straight, tmp_path_factory, isolated, damage, command):
    root = tmp_path_factory.mktemp("damaged")
    run = root / "runs" / "straight"
    shutil.copytree(straight["run_dir"], run)
    other = root / "runs" / "other"
    shutil.copytree(straight["run_dir"], other)
    _damage(run, damage)
    ledger = root / "runs" / "ledger.jsonl"
    ledger.write_bytes(b'{"run_id": "a", "seed": 1}\n' + damage[0][3])
    argv = {
        "report": ["report", str(run)],
        "compare": ["compare", str(run), str(other), "--no-plot"],
        "significance": ["significance", str(run), str(other), "--baseline", str(other), str(run)],
        "ledger": ["ledger", "--file", str(ledger)],
    }[command]
    code, _, err = _call(argv)
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (0, 2) or command == "significance" and code == 1, (code, err)
    assert code == 0 or _errors_only(err), err
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]
    report = run / "report.md"
    if command == "report" and code == 0:
        assert report.read_text().endswith("\n") and "## Curves" in report.read_text()


def _errors_only(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith(("error: ", "warning: ")) for line in lines)


def _base(small_data) -> list[str]:
    argv = ["run", str(STACKS / "baseline.toml"), "--out-dir", "runs"]
    for expr in _tiny(small_data):
        argv += ["--set", expr]
    return argv


@pytest.fixture(scope="module")
def failed_run(small_data, tmp_path_factory) -> Path:
    """``runs/`` holding ``r.failed``: stopped by a NaN at step 5 of 6, checkpointed after step 4 (made once)."""
    root = tmp_path_factory.mktemp("failed")
    cwd, env = os.getcwd(), dict(os.environ)
    os.chdir(root)
    os.environ.update(PGOLF_FAULT="nan:step=5", PGOLF_PROGRESS="0")
    try:
        assert _call(_base(small_data) + ["--run-id", "r", "--checkpoint-every", "2"])[0] == 4
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    return root / "runs"


@settings(max_examples=8, **SETTINGS)
@given(damage=st.lists(st.tuples(st.sampled_from(["COMPLETE.json", "rank0.pt", "stack.toml", "log.txt", "metrics.jsonl"]),
                                 st.sampled_from(["truncate", "bytes", "delete", "directory"]), st.integers(0, 300), st.binary(max_size=30)),
                       min_size=1, max_size=2))
def test_fuzz_resume_of_a_damaged_run(small_data, failed_run, tmp_path_factory, isolated, damage):
    """A failed run whose files were damaged: --resume continues it, or refuses with one line and leaves it as it was."""
    root = tmp_path_factory.mktemp("resume")
    os.chdir(root)
    shutil.copytree(failed_run, root / "runs")
    failed = root / "runs" / "r.failed"
    for name, kind, offset, blob in damage:
        path = failed / "checkpoints" / "step_00000004" / name if name in ("COMPLETE.json", "rank0.pt") else failed / name
        if kind == "truncate" and path.is_file():
            path.write_bytes(path.read_bytes()[:offset])
        elif kind == "bytes" and not path.is_dir():
            path.write_bytes(blob)
        elif kind == "delete" and path.is_file():
            path.unlink()
        elif kind == "directory" and not path.is_dir():
            path.unlink(missing_ok=True)
            path.mkdir()
    before = {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}
    code, _, err = _call(_base(small_data) + ["--resume", str(failed)])
    _assert_clean(code, err, root)
    if code == 2:
        after = {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}
        assert after == before, "a refused resume changed the run directory"
