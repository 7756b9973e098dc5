"""Recovery: elastic restarts, non-finite steps, a full disk, atomic outputs and the run ledger.

Faults are injected, never waited for: ``PGOLF_FAULT`` (``pgolf_core/faults.py``) kills a worker or turns a
step's loss into NaN, and a patched ``pgolf_core.rundir._write_all`` raises ENOSPC on a chosen write. Runs go
through the CLI in-process (one torchrun job for elastic restarts) on the sp1024 fixture with its validation
split cut to 4,097 tokens, so each run takes a few seconds.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import FIXTURE_1024, STACKS, TOKENIZER_1024, tiny_stack
from pgolf_core import checkpoint
from pgolf_core import rundir as rundir_module
from pgolf_core.cli import main
from pgolf_core.cli import run as run_command
from pgolf_core.errors import DiskFullError, NonFiniteError
from pgolf_core.logparse import parse_log
from pgolf_core.runtime import Runtime

ITERATIONS = 6


def _tiny(data: Path) -> list[str]:
    return [
        "model.num_layers=2", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
        "data.train_seq_len=32", "data.train_batch_tokens=1024", "data.val_batch_size=4096",
        f'data.path="{data}"', f'data.tokenizer="{TOKENIZER_1024}"', f"run.iterations={ITERATIONS}", "run.warmup_steps=0",
        "run.max_wallclock_seconds=0.0", "run.val_loss_every=3", "run.train_log_every=1", "run.grad_accum_base=2",
        "schedule.warmdown_iters=3",
    ]


def _argv(data: Path, out_dir: Path, *extra: str, run_id: str | None = None, checkpoint_every: int | None = None, resume: Path | None = None):
    argv = ["run", str(STACKS / "baseline.toml"), "--out-dir", str(out_dir)]
    for expr in [*_tiny(data), *extra]:
        argv += ["--set", expr]
    if run_id:
        argv += ["--run-id", run_id]
    if checkpoint_every:
        argv += ["--checkpoint-every", str(checkpoint_every)]
    if resume:
        argv += ["--resume", str(resume)]
    return argv


def _numbers(run_dir: Path):
    got = parse_log((run_dir / "log.txt").read_text())
    return got["train_loss"], got["val"], got["finals"]


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The fixture's training shards and the first 4,097 tokens of its validation split."""
    from pgolf_core.data import load_shard
    from pgolf_core.sample import write_shard

    d = tmp_path_factory.mktemp("data")
    for name in ("fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        (d / name).symlink_to(FIXTURE_1024 / name)
    write_shard(d / "fineweb_val_000000.bin", load_shard(FIXTURE_1024 / "fineweb_val_000000.bin").numpy()[:4097])
    return d


@pytest.fixture(scope="module")
def straight(small_data, tmp_path_factory):
    """An uninterrupted run (with its report), recording every file written through ``atomic_write``."""
    out_dir = tmp_path_factory.mktemp("straight")
    written: list[str] = []
    real = rundir_module.atomic_write

    def recording(path, data):
        written.append(Path(path).name)
        return real(path, data)

    rundir_module.atomic_write = recording
    old = os.environ.get("PGOLF_PROGRESS")
    os.environ["PGOLF_PROGRESS"] = "0"
    try:
        assert main(_argv(small_data, out_dir, run_id="straight")) == 0
    finally:
        rundir_module.atomic_write = real
        if old is None:
            os.environ.pop("PGOLF_PROGRESS", None)
        else:
            os.environ["PGOLF_PROGRESS"] = old
    run_dir = out_dir / "straight"
    return {"run_dir": run_dir, "numbers": _numbers(run_dir), "written": written}


@pytest.fixture
def cli(monkeypatch, capsys):
    """``pgolf run`` in-process; reports are skipped (the straight run covers them), signal handlers restored."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(run_command, "_report", lambda run_dir: None)
    monkeypatch.setenv("PGOLF_PROGRESS", "0")

    def run(argv: list[str], fault: str | None = None) -> tuple[int, str]:
        if fault:
            monkeypatch.setenv("PGOLF_FAULT", fault)
        else:
            monkeypatch.delenv("PGOLF_FAULT", raising=False)
        code = main(argv)
        return code, capsys.readouterr().err

    yield run
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _cpu_runtime() -> Runtime:
    return Runtime(0, 1, 0, False, torch.device("cpu"), False, False, 2)


# -- non-finite loss and gradients ----------------------------------------------------------------------------
def test_nonfinite_stop_fails_at_the_next_check_keeping_the_last_finite_checkpoint_and_resumes_to_identical_numbers(cli, small_data, straight, tmp_path):
    """"stop" adds no host read to a step: step 5's NaN is found where the loop reads the loss it logs (every step
    up to 10), after its update; the checkpoint of step 3 was checked finite before it was written."""
    runs = tmp_path / "runs"
    code, err = cli(_argv(small_data, runs, run_id="cut", checkpoint_every=3), fault="nan:step=5")
    (line,) = _errors(err)
    assert code == 4
    assert line.startswith(
        "error: non-finite loss or gradients at step 5/6 (train_loss:nan; train loss non-finite from step 5, weights non-finite); "
        "techniques: embedding=token "
    )
    assert "optimizer=muon" in line and "the last checkpoint (step 3) holds the last state checked finite" in line
    assert 'run.on_nonfinite = "skip"' in line
    failed = runs / "cut.failed"
    assert [d.name for d in (failed / "checkpoints").iterdir()] == ["step_00000003"]
    state = checkpoint.load(checkpoint.latest(failed), _cpu_runtime())
    assert state["loop"]["step"] == 3 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert "step:5/6 train_loss" not in (failed / "log.txt").read_text()  # the failed step is not reported as trained

    code, err = cli(_argv(small_data, runs, resume=failed))  # the fault was transient: the same stack continues
    assert code == 0, err
    assert "resumed at step:3/6" in (runs / "cut" / "log.txt").read_text()
    assert _numbers(runs / "cut") == straight["numbers"]


def test_nonfinite_skip_drops_the_update_and_counts_it(cli, small_data, straight, tmp_path):
    runs = tmp_path / "runs"
    code, err = cli(_argv(small_data, runs, 'run.on_nonfinite="skip"', run_id="skip"), fault="nan:step=2")
    assert code == 0, err
    run_dir = runs / "skip"
    log = (run_dir / "log.txt").read_text()
    assert "step:2/6 nonfinite train_loss:nan grad_norm:nan: update skipped (run.on_nonfinite=skip; 1 so far)" in log
    train, _, finals = _numbers(run_dir)
    assert train[1] == straight["numbers"][0][1] and math.isnan(train[2])
    assert all(math.isfinite(loss) for name, (loss, bpb) in finals.items())
    assert json.loads((run_dir / "summary.json").read_text())["nonfinite_skips"] == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m for m in metrics if m["kind"] == "nonfinite"][0]["action"] == "skip"
    (record,) = [json.loads(line) for line in (runs / "ledger.jsonl").read_text().splitlines()]
    assert record["nonfinite_skips"] == 1 and record["status"] == "complete"


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_nonfinite_gradient_alone_is_caught(registry):
    """The checks cover gradients, not only the loss: under "skip" the step is dropped before its update (weights and
    optimizer state as they were); under "stop" the weights it made non-finite are found at the next check."""
    from pgolf_core.train import Trainer, load_data

    stack = tiny_stack(registry, 'run.on_nonfinite="skip"', "run.grad_accum_base=2", "data.train_batch_tokens=1024")
    logs: list[str] = []
    trainer = Trainer(stack, registry, _cpu_runtime(), load_data(stack, torch.device("cpu"), registry), lambda m, console=True: logs.append(m), lambda **r: None)
    trainer.train_step(0, 1.0)  # a normal step first: the optimizers have state to protect
    weights = copy.deepcopy(trainer.base_model.state_dict())
    opt_state = copy.deepcopy(trainer.optimizers.state_dict())
    param = trainer.base_model.token_embedding()
    handle = param.register_hook(lambda g: g * float("nan"))
    loss = trainer.train_step(1, 1.0)
    assert torch.isfinite(loss) and trainer.nonfinite_skips == 1
    assert _state_equal(weights, trainer.base_model.state_dict()) and _state_equal(opt_state, trainer.optimizers.state_dict())
    assert "step:2/2 nonfinite" in logs[-1] and "grad_norm:nan" in logs[-1]

    trainer.stack = tiny_stack(registry, "run.grad_accum_base=2", "data.train_batch_tokens=1024")  # on_nonfinite = "stop"
    assert trainer.check_finite(1, loss) == pytest.approx(float(loss))  # finite so far: the loss the loop would log
    loss = trainer.train_step(1, 1.0)  # no host read: the NaN update is applied
    handle.remove()
    assert torch.isfinite(loss) and not torch.isfinite(param).all()
    with pytest.raises(NonFiniteError) as info:
        trainer.check_finite(2, loss)
    (problem,) = info.value.problems
    assert problem.startswith("non-finite loss or gradients at step 2/2 (train_loss:") and "weights non-finite, train loss finite: a non-finite gradient after step 1" in problem
    assert "checkpoint" not in problem and "modifier" not in problem


# -- a full disk ----------------------------------------------------------------------------------------------
def _enospc_on(monkeypatch, name: str, nth: int = 1) -> dict:
    """Make the ``nth`` write of a file named ``name`` fail as on a full disk."""
    real = rundir_module._write_all
    seen = {"calls": 0}

    def write(f, data):
        if Path(f.name).name.startswith(f".{name}.tmp"):
            seen["calls"] += 1
            if seen["calls"] == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, data)

    monkeypatch.setattr(rundir_module, "_write_all", write)
    return seen


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(cli, small_data, straight, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _enospc_on(monkeypatch, "rank0.pt", nth=2)  # the checkpoint after step 4
    code, err = cli(_argv(small_data, runs, run_id="full", checkpoint_every=2))
    (line,) = _errors(err)
    assert code == 5
    assert line == (
        f"error: disk full while writing {runs}/full.partial/checkpoints/step_00000004/rank0.pt; free space or set "
        "run.out_dir (--out-dir) to a disk with room, then continue with --resume RUN_DIR if the run had checkpoints"
    )
    failed = runs / "full.failed"
    latest = checkpoint.latest(failed)
    assert latest.name == "step_00000002" and checkpoint.load(latest, _cpu_runtime())["loop"]["step"] == 2
    assert not (failed / "checkpoints" / "step_00000004").exists() and _temp_files(failed) == []

    monkeypatch.undo()  # space is free again
    monkeypatch.setattr(run_command, "_report", lambda run_dir: None)
    code, err = cli(_argv(small_data, runs, resume=failed))
    assert code == 0, err
    assert _numbers(runs / "full") == straight["numbers"]


def test_disk_full_while_writing_the_artifact(cli, small_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _enospc_on(monkeypatch, "final_model.int8.ptz")
    code, err = cli(_argv(small_data, runs, "run.iterations=1", run_id="art"))
    (line,) = _errors(err)
    assert code == 5 and line.startswith(f"error: disk full while writing {runs}/art.partial/final_model.int8.ptz; free space")
    failed = runs / "art.failed"
    assert not list(failed.glob("final_model*")) and not (failed / "submission.json").exists() and _temp_files(failed) == []
    (record,) = [json.loads(line) for line in (runs / "ledger.jsonl").read_text().splitlines()]
    assert record["status"] == "failed" and record["error"].startswith("disk full while writing")


def test_atomic_write_on_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    _enospc_on(monkeypatch, "summary.json")
    with pytest.raises(DiskFullError, match=f"disk full while writing {target};"):
        rundir_module.atomic_write(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_log_line_on_a_full_disk_is_one_error_and_the_run_still_fails_cleanly(tmp_path):
    run = rundir_module.RunDir(str(tmp_path), "r", is_master=True, echo=False)
    run.open()

    class FullDisk:
        name = str(run.path / "log.txt")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    run._log.close()
    run._log = FullDisk()
    with pytest.raises(DiskFullError) as info:
        run.log("step:1/2 train_loss:6.9")
    assert info.value.problems == [
        f"disk full while writing {run.path}/log.txt; free space or set run.out_dir (--out-dir) to a disk with room, "
        "then continue with --resume RUN_DIR if the run had checkpoints"
    ]
    assert run.fail("disk full") == tmp_path / "r.failed"


# -- atomic outputs -------------------------------------------------------------------------------------------
def test_every_file_a_run_writes_goes_through_a_temporary_name(straight):
    run_dir = straight["run_dir"]
    files = {p.name for p in run_dir.iterdir() if p.is_file()}
    streamed = {"log.txt", "metrics.jsonl"}  # appended inside <run>.partial/, committed by the directory's rename
    assert {"stack.toml", "final_model.int8.ptz", "submission.json", "summary.json", "report.md"} <= files
    assert files - streamed <= set(straight["written"]), files - streamed - set(straight["written"])
    assert _temp_files(run_dir) == [] and not run_dir.with_name("straight.partial").exists()


# -- the ledger -----------------------------------------------------------------------------------------------
def test_ledger_records_each_run_and_groups_seeds_by_recipe(cli, small_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _ = cli(_argv(small_data, runs, "run.iterations=2", "run.seed=1", run_id="seed1"))
    assert code == 0
    code, _ = cli(_argv(small_data, runs, "run.iterations=2", "run.seed=2", run_id="seed2"), fault="nan:step=1")
    assert code == 4
    records = [json.loads(line) for line in (runs / "ledger.jsonl").read_text().splitlines()]
    assert [(r["run_id"], r["seed"], r["status"]) for r in records] == [("seed1", 1, "complete"), ("seed2", 2, "failed")]
    done, failed = records
    assert done["recipe_sha256"] == failed["recipe_sha256"] and done["stack_sha256"] != failed["stack_sha256"]
    assert done["stack_sha256"] == hashlib.sha256((runs / "seed1" / "stack.toml").read_bytes()).hexdigest()
    artifact = runs / "seed1" / "final_model.int8.ptz"
    assert done["artifact"] == {"file": artifact.name, "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(), "bytes": artifact.stat().st_size}
    summary = json.loads((runs / "seed1" / "summary.json").read_text())
    assert done["bytes_total"] == summary["bytes_total"] and done["val_bpb"] == summary["final"][summary["score_line"]]["val_bpb"]
    assert done["pgolf"] and done["plugins"]["pgolf"] == done["pgolf"] and set(done["git"] or {}) <= {"commit", "dirty"}
    assert "non-finite loss or gradients at step 1/2" in failed["error"] and "artifact" not in failed

    capsys.readouterr()
    assert main(["ledger", "--out-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert f"recipe {done['recipe_sha256'][:12]}" in out and "seeds: 1, 2; no complete run for seed 2" in out
    assert out.count(done["recipe_sha256"][:12]) == 1 and "seed1" in out and "seed2" in out


def test_ledger_lines_from_concurrent_writers_stay_whole(tmp_path):
    from pgolf_core.ledger import append, read

    path = tmp_path / "ledger.jsonl"
    payload = "x" * 20_000  # larger than a pipe buffer: one write call per line is what keeps it whole

    def writer(i: int) -> None:
        for j in range(20):
            append(path, {"run_id": f"{i}-{j}", "pad": payload})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records, bad = read(path)
    assert bad == 0 and sorted(r["run_id"] for r in records) == sorted(f"{i}-{j}" for i in range(4) for j in range(20))


# -- elastic restarts -----------------------------------------------------------------------------------------
def _torchrun(args: list[str], cwd: Path, fault: str | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR")}
    env.update(OMP_NUM_THREADS="1", PGOLF_PROGRESS="0")
    if fault:
        env["PGOLF_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}", "-m", "pgolf", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_elastic_restart_resumes_a_killed_worker_to_identical_numbers(small_data, tmp_path):
    """torchrun --max-restarts=1: rank 1 dies after step 3 (first attempt only); the restarted workers find the
    run by its torchelastic run id, resume from the step-2 checkpoint and finish with an uninterrupted run's numbers."""
    runs = tmp_path / "runs"
    straight = _torchrun(_argv(small_data, runs, run_id="straight"), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    elastic = _torchrun(_argv(small_data, runs, checkpoint_every=2), tmp_path, fault="exit:step=3:rank=1", restarts=1)
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    assert "PGOLF_FAULT: exiting with code 17 after step 3" in elastic.stderr
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and p.name != "straight"]
    assert run_dir.name.startswith("baseline-")  # named after the job: both attempts agree on it
    log = (run_dir / "log.txt").read_text()
    assert "resumed at step:2/6" in log
    assert _numbers(run_dir) == _numbers(runs / "straight")
    records = [json.loads(line) for line in (runs / "ledger.jsonl").read_text().splitlines() if run_dir.name in line]
    assert records[-1]["status"] == "complete" and records[-1]["restart"] == 1


def test_documented_exit_codes_are_the_ones_raised():
    from conftest import REPO
    from pgolf_core.errors import BudgetError, ConfigError, OutputClosedError, StoppedError
    from pgolf_core.train import Interrupted

    doc = (REPO / "docs" / "reliability.md").read_text()
    for error in (ConfigError, BudgetError, NonFiniteError, DiskFullError, Interrupted, StoppedError, OutputClosedError):
        assert f"\n| {error.exit_code} |" in doc, error.__name__
