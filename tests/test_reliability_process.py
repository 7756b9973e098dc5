"""Process edges: signals in every phase, a double Ctrl-C, a closed stdout, a stray RANK/WORLD_SIZE, and plugins
that call ``sys.exit`` or raise.

Signals are sent by the process to itself from inside the phase under test (a patched function of that
phase), so each test is deterministic and takes the time of a tiny run; one test sends a real double Ctrl-C
to a subprocess to check the same from outside.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

import pgolf_core.registry as registry_module
from pgolf_core import rundir as rundir_module
from pgolf_core import finalize as finalize_module
from pgolf_core import train as train_module
from pgolf_core.cli import main
from test_reliability import _argv, _errors, cli, small_data  # noqa: F401 (fixtures)
from test_reliability_rundir import _env, _ledger
from test_workflow_plugins import make_dist


def _kill_self_then(fn, sig=signal.SIGTERM, times: int = 1):
    def wrapper(*args, **kwargs):
        for _ in range(times):
            os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    "phase, target, words",
    [
        ("export", (finalize_module, "build_artifact"), "stopped by SIGTERM after training (export and final evaluation)"),
        ("final-evaluation", ("pgolf.plugins.evaluator.full_val", "eval_val"), "stopped by SIGTERM after training (export and final evaluation)"),
        ("setup", (train_module.Trainer, "log_header"), "stopped by SIGTERM before training (setup)"),
    ],
    ids=["export", "final-evaluation", "setup"],
)
def test_sigterm_is_honoured_after_training(cli, small_data, tmp_path, monkeypatch, phase, target, words):
    """It used to be swallowed after the loop with --checkpoint-every: exit 0, 21 s later."""
    import importlib

    runs = tmp_path / "runs"
    owner, name = target
    owner = importlib.import_module(owner) if isinstance(owner, str) else owner
    monkeypatch.setattr(owner, name, _kill_self_then(getattr(owner, name)))
    t0 = time.perf_counter()
    code, err = cli(_argv(small_data, runs, run_id="r", checkpoint_every=2))
    (line,) = _errors(err)
    assert code == 130 and line.startswith(f"error: {words}; continue with --resume RUN_DIR from the last checkpoint")
    assert time.perf_counter() - t0 < 20
    (record,) = _ledger(runs)
    assert record["status"] == "interrupted" and record["error"].startswith(words)
    assert (runs / "r.failed").is_dir() and not (runs / "r.failed" / "summary.json").exists()
    assert not list(runs.rglob(".*tmp*"))


def test_sigterm_during_training_without_checkpoints_stops_at_once(cli, small_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    real = train_module.Trainer.train_step
    calls = []

    def step(self, step, scale):
        calls.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step, scale)

    monkeypatch.setattr(train_module.Trainer, "train_step", step)
    code, err = cli(_argv(small_data, runs, run_id="r"))
    (line,) = _errors(err)
    assert code == 130 and line == (
        "error: stopped by SIGTERM training at step 2; the run had no checkpoints (--checkpoint-every N lets --resume continue a stopped run)"
    )
    assert calls == [0, 1, 2] and _ledger(runs)[0]["status"] == "interrupted"


def test_a_double_ctrl_c_exits_cleanly_with_the_ledger_line(cli, small_data, tmp_path, monkeypatch):
    """The second Ctrl-C lands while the first one's cleanup is marking the run failed: it waits."""
    runs = tmp_path / "runs"
    monkeypatch.setattr(finalize_module, "build_artifact", _kill_self_then(finalize_module.build_artifact, signal.SIGINT))
    monkeypatch.setattr(rundir_module.RunDir, "fail", _kill_self_then(rundir_module.RunDir.fail, signal.SIGINT, times=2))
    code, err = cli(_argv(small_data, runs, run_id="r"))
    assert code == 130 and "Traceback" not in err
    assert _errors(err) == ["error: stopped by SIGINT after training (export and final evaluation); the run had no checkpoints "
                            "(--checkpoint-every N lets --resume continue a stopped run)"]
    assert "pgolf: SIGINT: already stopping; finishing the run directory and its ledger line first" in err
    (record,) = _ledger(runs)
    assert record["status"] == "interrupted" and (runs / "r.failed").is_dir() and not (runs / "r.lock").exists()


def test_a_real_double_ctrl_c(small_data, tmp_path):
    """Two SIGINTs 30 ms apart, as a user's double Ctrl-C: exit 130, one error line, the ledger line written."""
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "pgolf", *_argv(small_data, runs, "run.iterations=400", "run.val_loss_every=0", run_id="r", checkpoint_every=2)]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = runs / "r.partial" / "log.txt"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (log.exists() and "step:3/400 train_loss" in log.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.03)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert len(_errors(err)) == 1
    (record,) = _ledger(runs)
    assert record["status"] == "interrupted" and (runs / "r.failed").is_dir()


def test_a_closed_stdout_fails_the_run_with_a_non_zero_exit(small_data, tmp_path):
    """``pgolf run ... | head -2``: the run used to fail and exit 0."""
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "pgolf", *_argv(small_data, runs, "run.iterations=10", run_id="r")]  # prints for a while
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.readline()
    proc.stdout.close()  # head -2 exits
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert code == 141 and "Traceback" not in err and "Exception ignored" not in err, (code, err[-3000:])
    (line,) = _errors(err)
    assert line.startswith("error: stdout was closed (broken pipe) while the run was printing; the run stopped")
    (record,) = _ledger(runs)
    assert record["status"] == "failed" and (runs / "r.failed").is_dir()


def test_a_closed_stdout_is_exit_141_for_every_command(monkeypatch, capsys):
    """``pgolf list | head -1``: the reader left; no message, and not exit 0 (stdout is replaced in-process
    by one whose reader is gone, and the descriptor swap that keeps the interpreter's last flush quiet is skipped)."""
    import pgolf_core.cli as cli_module

    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    silenced = []
    monkeypatch.setattr(cli_module, "_silence_stdout", lambda: silenced.append(True))
    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["stacks"]) == 141 and silenced == [True]
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "environment RANK='zero': not an integer; launch several processes with torchrun"),
        ({"RANK": "0"}, "environment RANK='0' is set but WORLD_SIZE is not"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
         "environment RANK=0 and WORLD_SIZE=2 are set, but this process was not started by torchrun (no TORCHELASTIC_RUN_ID): its peers would never join"),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "j"}, "environment RANK=0 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not"),
        ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "environment RANK=3: must be in 0..1 for WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
         "environment MASTER_PORT='http': not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "-1"}, "environment WORLD_SIZE=-1: must be >= 1"),
    ],
    ids=["garbage", "rank-only", "no-torchrun", "torchrun-without-master", "rank-outside-world", "bad-port", "negative-world"],
)
def test_a_stray_or_garbled_process_layout_is_one_line(cli, small_data, tmp_path, monkeypatch, env, words):
    """A RANK/WORLD_SIZE exported by hand used to wait forever for peers (or print a traceback)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = cli(_argv(small_data, tmp_path / "runs", run_id="r"))
    (line,) = _errors(err)
    assert code == 2 and line.startswith(f"error: {words}") and not (tmp_path / "runs").exists()


def test_rank_zero_of_a_world_of_one_without_a_launcher_is_one_process(cli, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    code, err = cli(_argv(small_data, tmp_path / "runs", "run.iterations=1", run_id="r"))
    assert code == 0, err


# -- plugins ----------------------------------------------------------------------------------------------
EXITS_ON_IMPORT = "import sys\nsys.exit(3)\n"
RAISES_IN_REGISTRATION = '''
from pgolf_core.hookspecs import hookimpl


@hookimpl
def pgolf_register_techniques(register):
    raise RuntimeError("no GPU kernels for this card")
'''
EXITS_IN_REGISTRATION = RAISES_IN_REGISTRATION.replace('raise RuntimeError("no GPU kernels for this card")', "raise SystemExit(4)")


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """Install a one-module plugin distribution whose body is given; the process-wide registry is rebuilt."""
    monkeypatch.setattr(registry_module, "_DEFAULT", None)
    for var in ("PGOLF_DISABLE_PLUGIN_AUTOLOAD", "PGOLF_LOAD_PLUGINS", "PGOLF_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield lambda body: make_dist(tmp_path, dist="pgolf-rude", module="pgolf_rude_plugin", name="rude", body=body)
    sys.modules.pop("pgolf_rude_plugin", None)


@pytest.mark.parametrize(
    "body, words",
    [
        (EXITS_ON_IMPORT, "called sys.exit(3) on import"),
        (RAISES_IN_REGISTRATION, "pgolf_register_techniques raised RuntimeError: no GPU kernels for this card"),
        (EXITS_IN_REGISTRATION, "called sys.exit(4) in pgolf_register_techniques"),
    ],
    ids=["sys-exit-on-import", "raises-in-registration", "sys-exit-in-registration"],
)
def test_a_rude_plugin_is_contained_and_named(plugin_dist, capsys, body, words):
    """A plugin calling sys.exit on import used to silence every command."""
    from conftest import STACKS

    plugin_dist(body)
    assert main(["list", "--slot", "compressor"]) == 0
    out = capsys.readouterr().out
    assert f"failed plugin pgolf-rude 0.2.0 (pgolf:rude): {words}" in out and "zlib" in out
    assert main(["validate", str(STACKS / "sample.toml")]) == 0


def test_a_local_plugin_that_exits_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry_module, "_DEFAULT", None)
    plugin = tmp_path / "rude.py"
    plugin.write_text(EXITS_ON_IMPORT)
    assert main(["list", "--plugin", str(plugin)]) == 2
    assert capsys.readouterr().err == f"error: --plugin {plugin}: cannot import: called sys.exit(3) on import\n"
    plugin.write_text(RAISES_IN_REGISTRATION)
    assert main(["list", "--plugin", str(plugin)]) == 2
    assert "pgolf_register_techniques raised RuntimeError: no GPU kernels for this card" in capsys.readouterr().err


def test_a_plugin_failing_during_a_run_is_named(cli, small_data, tmp_path, monkeypatch):
    """A loop observer of a plugin that raises, or calls sys.exit, mid-run: exit 1 naming the plugin, the run
    directory marked failed with its ledger line."""
    monkeypatch.setattr(registry_module, "_DEFAULT", None)
    plugin = tmp_path / "observer.py"
    for body, words in (
        ("raise ValueError('observer broke')", "internal error in plugin pgolf_local_observer ({p}): ValueError: observer broke"),
        ("raise SystemExit(9)", "internal error: plugin pgolf_local_observer ({p}) called sys.exit(9)"),
    ):
        plugin.write_text(f"from pgolf_core.hookspecs import hookimpl\n\n@hookimpl\ndef pgolf_on_step_end(state):\n    {body}\n")
        sys.modules.pop("pgolf_local_observer", None)
        monkeypatch.setattr(registry_module, "_DEFAULT", None)
        runs = tmp_path / f"runs{len(words)}"
        code, err = cli(_argv(small_data, runs, "run.iterations=2", run_id="r") + ["--plugin", str(plugin)])
        (line,) = _errors(err)
        assert code == 1 and line.startswith("error: " + words.format(p=plugin)), line
        assert _ledger(runs)[0]["status"] == "failed" and (runs / "r.failed").is_dir()
    sys.modules.pop("pgolf_local_observer", None)


def test_a_signal_before_the_run_directory_exists_leaves_nothing(cli, small_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "load_data", _kill_self_then(train_module.load_data))
    code, err = cli(_argv(small_data, tmp_path / "runs", run_id="r", checkpoint_every=2))
    assert code == 130 and _errors(err) == ["error: stopped by SIGTERM before training (setup); nothing was written"]
    assert not (tmp_path / "runs").exists()
