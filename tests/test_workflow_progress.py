"""The progress bar: what it draws, when it is used (rank 0 on a terminal), and a real run under a pty."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
import types

import pytest

from pgolf_core.progress import ProgressBar, attach, duration, interactive, rate
from pgolf_core.registry import Registry


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _state(step, iterations=100, train_time_ms=0.0, loss=None, cap=0.0, tokens=4096, last_val=None):
    stack = types.SimpleNamespace(data=types.SimpleNamespace(train_batch_tokens=tokens), run=types.SimpleNamespace(max_wallclock_seconds=cap))
    return types.SimpleNamespace(step=step, iterations=iterations, train_time_ms=train_time_ms, train_loss=loss, stack=stack, last_val=last_val)


def test_bar_shows_steps_throughput_loss_and_eta():
    bar = ProgressBar(Terminal(), width=120)
    line = bar.render(_state(25, 100, train_time_ms=5000.0, loss=3.14159))
    assert line.startswith("[") and "step 25/100 · 20.5k tok/s · loss 3.1416 · 5s, ETA 15s" in line
    assert line.count("#") == round(0.25 * (line.index("]") - 1))


def test_eta_is_the_wallclock_cap_when_that_comes_first():
    bar = ProgressBar(Terminal(), width=120)
    line = bar.render(_state(10, 20000, train_time_ms=590_000.0, cap=600.0))
    assert "ETA 10s (cap)" in line
    assert bar.eta(_state(0, 10, cap=0.0)) == (None, False)


def test_bar_redraws_in_place_and_prints_validation_above_it():
    term, out = Terminal(), io.StringIO()
    bar = ProgressBar(term, out=out, min_interval=0.0, width=100)
    bar.pgolf_on_train_start(_state(0))
    bar.pgolf_on_step_end(_state(1, train_time_ms=100.0, loss=6.5))
    bar.console("step:1/100 train_loss:6.5000 train_time:100ms step_avg:100.00ms")  # shown by the bar only
    bar.console("step:1/100 val_loss:6.4000 val_bpb:3.5000 train_time:100ms step_avg:100.00ms")
    bar.console("swa:start step:1")
    bar.pgolf_on_train_end(_state(1, train_time_ms=100.0, loss=6.5))
    assert out.getvalue() == "step:1/100 val_loss:6.4000 val_bpb:3.5000 train_time:100ms step_avg:100.00ms\nswa:start step:1\n"
    frames = term.getvalue()
    assert frames.count("\r\x1b[K") >= 4 and frames.endswith("\n") and "loss 6.5000" in frames
    bar.console("final_int8_zlib_roundtrip val_loss:6.4")  # after training, lines pass straight through
    assert out.getvalue().endswith("final_int8_zlib_roundtrip val_loss:6.4\n")


def test_bar_throttles_redraws():
    term = Terminal()
    bar = ProgressBar(term, min_interval=60.0, width=80)
    bar.pgolf_on_train_start(_state(0))
    for step in range(1, 50):
        bar.pgolf_on_step_end(_state(step, train_time_ms=10.0 * step))
    assert term.getvalue().count("\r\x1b[K") == 1


def test_only_rank_0_on_a_terminal_gets_a_bar(monkeypatch):
    monkeypatch.delenv("PGOLF_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    registry = Registry()
    rundir = types.SimpleNamespace(console=None)
    master, worker = types.SimpleNamespace(is_master=True), types.SimpleNamespace(is_master=False)
    attach(registry, rundir, master, stream=io.StringIO())()  # a pipe or file: plain lines
    attach(registry, rundir, worker, stream=Terminal())()
    assert rundir.console is None and not registry.pm.has_plugin("pgolf:progress")
    detach = attach(registry, rundir, master, stream=Terminal())
    assert registry.pm.has_plugin("pgolf:progress") and rundir.console is not None
    detach()
    assert not registry.pm.has_plugin("pgolf:progress") and rundir.console is None
    monkeypatch.setenv("PGOLF_PROGRESS", "0")
    assert not interactive(Terminal())
    monkeypatch.setenv("PGOLF_PROGRESS", "1")
    monkeypatch.setenv("TERM", "dumb")
    assert not interactive(Terminal())


def test_units():
    assert [duration(s) for s in (0.4, 59, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m05s"]
    assert [rate(r) for r in (950, 20480, 3.2e6)] == ["950", "20.5k", "3.2M"]


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_run_on_a_terminal_shows_the_bar_and_leaves_a_report(tmp_path):
    import pty

    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "TERM": "xterm", "COLUMNS": "120",
           "PGOLF_CACHE": str(tmp_path / ".cache"), "OMP_NUM_THREADS": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cmd = [sys.executable, "-m", "pgolf", "run", "sample", "--run-id", "tty", "--set", "run.iterations=3", "--set", "run.val_loss_every=0",
           "--set", "run.warmup_steps=0", "--set", "run.train_log_every=1"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks)[-2000:].decode(errors="replace")
    screen = b"".join(chunks).decode(errors="replace")
    assert "\r\x1b[K[" in screen and "step 3/3" in screen and "tok/s" in screen
    assert "train_loss:" not in screen  # per-step lines went to log.txt only
    assert "step:3/3 val_loss:" in screen and "final_int8_zlib_roundtrip_exact" in screen
    run = tmp_path / "runs" / "tty"
    assert (run / "log.txt").read_text().count("train_loss:") == 3
    assert "# sample-variant: run tty" in (run / "report.md").read_text()  # --set run.iterations=3: a variant of the stack
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
