"""Run directories nobody can clobber, and resume that is safe and truthful.

A run id is owned through ``<out_dir>/<run_id>.lock`` for the whole run; a fresh run never adopts another
run's ``.partial``; ``--resume`` is checked completely (stack, checkpoint marker, hashes, a ``weights_only``
load, iterations against the checkpoint's step) before it renames anything, and what ``--force`` lets
through is what the run records. Runs go through the CLI in-process on the small fixture of
``test_reliability.py``; the one killed run (``os._exit`` from ``PGOLF_FAULT``) is made once, in a subprocess.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf_core import checkpoint
from pgolf_core.errors import ConfigError, DataError
from pgolf_core.rundir import RunLock, _process_start
from test_reliability import _argv, _cpu_runtime, _errors, _numbers, cli, small_data, straight  # noqa: F401 (fixtures)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (a directory that must not change, compared before/after)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ledger(runs: Path) -> list[dict]:
    path = runs / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR")}
    return env | {"OMP_NUM_THREADS": "1", "PGOLF_PROGRESS": "0"}


@pytest.fixture(scope="module")
def killed(small_data, tmp_path_factory) -> Path:
    """``runs/`` of a run killed after step 3 of 6 (checkpoint at step 2), its lock left by a dead process."""
    runs = tmp_path_factory.mktemp("killed") / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf", *_argv(small_data, runs, run_id="r", checkpoint_every=2)],
        env=_env() | {"PGOLF_FAULT": "exit:step=3"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert sorted(p.name for p in runs.iterdir()) == ["r.lock", "r.partial"]
    return runs


@pytest.fixture
def failed(cli, small_data, tmp_path) -> Path:
    """``runs/cut.failed``: a run stopped by a NaN at step 5 of 6, its state after step 4 checkpointed."""
    runs = tmp_path / "runs"
    code, _ = cli(_argv(small_data, runs, run_id="cut", checkpoint_every=2), fault="nan:step=5")
    assert code == 4
    return runs / "cut.failed"


# -- ownership --------------------------------------------------------------------------------------------
def test_a_fresh_run_never_adopts_a_killed_runs_directory(cli, small_data, killed, straight, tmp_path):
    """The killed run's checkpoint used to be deleted and both runs' lines mixed in one log; now the second run
    is refused before it writes anything, and --resume continues the killed run (taking over its stale lock)."""
    runs = tmp_path / "runs"
    shutil.copytree(killed, runs)
    before = _tree(runs)
    code, err = cli(_argv(small_data, runs, "run.seed=7", run_id="r", checkpoint_every=2))
    (line,) = _errors(err)
    assert code == 2 and line == (
        f"error: {runs}/r.partial is the directory of a run with this id that was killed (or runs elsewhere); continue "
        f"it with --resume {runs}/r.partial, or choose another run.run_id (--run-id)"
    )
    del before["r.lock"]  # the dead process's lock was taken over, and released with the refusal
    assert _tree(runs) == before
    assert (runs / "r.partial" / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file() and _ledger(runs) == []

    code, err = cli(_argv(small_data, runs, resume=runs / "r.partial"))
    assert code == 0, err
    assert _numbers(runs / "r") == straight["numbers"]
    assert sorted(p.name for p in runs.iterdir()) == ["ledger.jsonl", "r"]  # lock released, nothing else left


def test_a_second_run_with_a_running_runs_id_is_refused(cli, small_data, tmp_path):
    """While one process runs ``same``, a second run of that id is refused; the first finishes alone."""
    import time

    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "pgolf", *_argv(small_data, runs, "run.iterations=12", "run.val_loss_every=0", run_id="same")]
    first = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (runs / "same.partial" / "log.txt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        code, err = cli(_argv(small_data, runs, "run.iterations=2", "run.seed=7", run_id="same"))
        running = first.poll() is None
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    (line,) = _errors(err)
    assert running and code == 2 and line.startswith(f"error: run id same is in use by pid {first.pid} on {socket.gethostname()} since ")
    log = (runs / "same" / "log.txt").read_text()
    assert log.count("\npgolf 0.1.0 python ") == 1 and "seed:1337" in log and "seed:7" not in log
    assert [(r["run_id"], r["seed"]) for r in _ledger(runs)] == [("same", 1337)]


def test_a_lock_held_by_a_live_process_refuses_until_it_is_gone(cli, small_data, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00Z", "pid_start": _process_start(holder.pid)}
        (runs / "r.lock").write_text(json.dumps(lock))
        code, err = cli(_argv(small_data, runs, "run.iterations=1", run_id="r"))
        (line,) = _errors(err)
        assert code == 2 and line.startswith(f"error: run id r is in use by pid {holder.pid} on {socket.gethostname()} since 2024-01-01T00:00:00Z")
        assert sorted(p.name for p in runs.iterdir()) == ["r.lock"]
    finally:
        holder.kill()
        holder.wait()
    code, err = cli(_argv(small_data, runs, "run.iterations=1", run_id="r"))
    assert code == 0, err
    assert not (runs / "r.lock").exists()


def test_lock_staleness(tmp_path, monkeypatch):
    """Same host and the pid gone (or reused by another process): stale. Another host: never broken. An earlier
    attempt of the same torchelastic job: stale, wherever it ran."""
    first = RunLock(tmp_path, "r")
    first.acquire()
    with pytest.raises(ConfigError, match=f"run id r is in use by pid {os.getpid()} on "):
        RunLock(tmp_path, "r").acquire()
    first.release()
    assert not (tmp_path / "r.lock").exists()

    def held_by(**fields):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "t", "pid_start": _process_start(os.getpid())} | fields
        (tmp_path / "r.lock").write_text(json.dumps(record))

    held_by(pid_start="0")  # our pid, but a process that started at another time: the pid was reused
    RunLock(tmp_path, "r").acquire()
    held_by(host="elsewhere", pid=1)
    with pytest.raises(ConfigError, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path, "r").acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    held_by(host="elsewhere", pid=1, job="job7", attempt=0)
    lock = RunLock(tmp_path, "r")
    lock.acquire()
    assert json.loads((tmp_path / "r.lock").read_text())["attempt"] == 1
    lock.release()


# -- resume -----------------------------------------------------------------------------------------------
def test_a_refused_resume_renames_nothing(cli, small_data, failed, tmp_path):
    """Every refusal (other stack, a seed or iterations --force may not change, damaged marker, a crafted
    checkpoint with a matching hash) leaves the directory as it was, under its name, and runs no code."""
    runs = failed.parent
    ckpt = failed / "checkpoints" / "step_00000004"
    before = _tree(runs)
    marker = (ckpt / "COMPLETE.json").read_bytes()
    rank0 = (ckpt / "rank0.pt").read_bytes()
    pwned = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    buf = io.BytesIO()
    torch.save({"model": Evil()}, buf)
    crafted = buf.getvalue()
    cases = [
        (["model.num_layers=3"], False, None, "the stack differs from the run's (model.num_layers: 2 -> 3); pass the same stack"),
        (["run.seed=7"], True, None, "(run.seed: 1337 -> 7); these change the model, its state or what the run's numbers mean"),
        (["run.iterations=3"], True, None, "run.iterations=3 is below the checkpoint's step 4; the run would never reach its last step"),
        ([], False, (b"{not json", rank0), "COMPLETE.json: not valid JSON; the checkpoint is damaged"),
        ([], False, (json.dumps({"step": 4, "world_size": 1, "sha256": [hashlib.sha256(crafted).hexdigest()]}).encode(), crafted),
         "rank0.pt: holds what a checkpoint does not (Trying to load unsupported GLOBAL posix.system"),
    ]
    for sets, force, damage, words in cases:
        if damage:
            (ckpt / "COMPLETE.json").write_bytes(damage[0])
            (ckpt / "rank0.pt").write_bytes(damage[1])
        argv = _argv(small_data, runs, *sets, resume=failed) + (["--force"] if force else [])
        code, err = cli(argv)
        (line,) = _errors(err)
        assert code == 2 and words in line, line
        (ckpt / "COMPLETE.json").write_bytes(marker)
        (ckpt / "rank0.pt").write_bytes(rank0)
        assert _tree(runs) == before, words
    assert not pwned.exists()


def test_a_forced_resume_records_what_it_ran(cli, small_data, failed):
    runs = failed.parent
    code, err = cli(_argv(small_data, runs, "run.val_loss_every=0", resume=failed) + ["--force"])
    assert code == 0, err
    run = runs / "cut"
    assert "val_loss_every = 0\n" in (run / "stack.toml").read_text()
    log = (run / "log.txt").read_text()
    assert "resume: --force changed run.val_loss_every: 3 -> 0" in log and "resumed at step:4/6" in log
    last = _ledger(runs)[-1]
    assert last["status"] == "complete" and last["forced"] == {"run.val_loss_every": [3, 0]} and last["resumed_from_step"] == 4
    assert last["stack_sha256"] == hashlib.sha256((run / "stack.toml").read_bytes()).hexdigest()


def test_a_failed_dash_directory_resumes(cli, small_data, failed, straight):
    """A second failure of the same run id lands in <id>.failed-XXXX; that directory resumes too."""
    runs = failed.parent
    code, _ = cli(_argv(small_data, runs, run_id="cut", checkpoint_every=2), fault="nan:step=5")
    assert code == 4
    (second,) = [p for p in runs.iterdir() if p.name.startswith("cut.failed-")]
    code, err = cli(_argv(small_data, runs, resume=second))
    assert code == 0, err
    assert _numbers(runs / "cut") == straight["numbers"] and (runs / "cut.failed").is_dir()


@pytest.mark.parametrize(
    "target, words",
    [
        (lambda runs: runs, "not a pgolf run directory (it has no stack.toml)"),
        (lambda runs: runs / "ledger.jsonl", "not a directory; pass a run directory such as runs/<run_id>.partial"),
        (lambda runs: runs / "nope.partial", "no such run directory"),
        (lambda runs: runs / "done", "that run already finished; nothing to resume"),
    ],
    ids=["plain-directory", "a-file", "missing", "finished"],
)
def test_resume_of_something_that_is_not_a_run_says_so(cli, small_data, tmp_path, target, words):
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    (runs / "done" / "stack.toml").write_text("schema_version = 1\n")
    (runs / "ledger.jsonl").write_text("")
    code, err = cli(_argv(small_data, runs, resume=target(runs)))
    (line,) = _errors(err)
    assert code == 2 and words in line
    assert sorted(p.name for p in runs.iterdir()) == ["done", "ledger.jsonl"]


# -- checkpoints --------------------------------------------------------------------------------------------
def test_checkpoints_round_trip_numpy_state_and_refuse_other_objects(tmp_path):
    import numpy as np

    rt = _cpu_runtime()
    rng = np.random.RandomState(3).get_state()
    state = {"rng": {"numpy": rng, "python": (3, tuple(range(5)), None)}, "n": np.int64(7), "w": torch.arange(3.0)}
    directory = checkpoint.save(tmp_path / "r.partial", 2, state, rt)
    back = checkpoint.load(directory, rt)
    assert back["rng"]["numpy"][0] == "MT19937" and np.array_equal(back["rng"]["numpy"][1], rng[1]) and back["rng"]["numpy"][2:] == rng[2:]
    assert back["rng"]["python"] == (3, (0, 1, 2, 3, 4), None) and back["n"] == 7 and back["n"].dtype == np.int64
    assert checkpoint.verify(directory, 1)["step"] == 2
    with pytest.raises(TypeError, match=r"checkpoint state\['x'\]: a pathlib.PosixPath cannot be stored"):
        checkpoint.save(tmp_path / "r.partial", 4, {"x": Path("/")}, rt)
    with pytest.raises(DataError, match="written by 1 processes, this run has 2; resume with --nproc-per-node 1"):
        checkpoint.verify(directory, 2)
