"""The ledger: an append is a whole line or nothing, readers survive a torn tail, a finished run always has
its line, and ``pgolf ledger`` shows what it can read of a damaged file instead of failing."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest

from pgolf_core import ledger as ledger_module
from pgolf_core import rundir as rundir_module
from pgolf_core.cli import main
from pgolf_core.errors import DiskFullError
from pgolf_core.ledger import append, read
from test_reliability import _argv, _errors, cli, small_data  # noqa: F401 (fixtures)


def _line(run_id: str, **extra) -> str:
    return json.dumps({"run_id": run_id, "status": "complete", "seed": 1, "recipe_sha256": "ab" * 32} | extra, sort_keys=True)


def test_a_short_write_leaves_no_half_line(tmp_path, monkeypatch):
    """A full disk mid-line used to leave half a record, to which the next run's line was glued."""
    path = tmp_path / "ledger.jsonl"
    append(path, {"run_id": "a"})
    before = path.read_bytes()
    monkeypatch.setattr(ledger_module, "_write", lambda fd, data: os.write(fd, data[: len(data) // 2]))
    with pytest.raises(DiskFullError, match=f"disk full while writing {path};"):
        append(path, {"run_id": "b", "pad": "x" * 1000})
    assert path.read_bytes() == before
    monkeypatch.undo()
    append(path, {"run_id": "c"})
    assert read(path) == ([{"run_id": "a"}, {"run_id": "c"}], 0)


def test_readers_skip_a_torn_tail_and_keep_the_next_record(tmp_path):
    path = tmp_path / "ledger.jsonl"
    torn = _line("b")[:25]
    path.write_text(_line("a") + "\n" + torn)  # a writer died mid-line
    append(path, json.loads(_line("c")))  # the next append starts a line of its own
    assert path.read_text().splitlines()[1:] == [torn, _line("c")]
    records, bad = read(path)
    assert [r["run_id"] for r in records] == ["a", "c"] and bad == 1
    # a file written before appends closed torn lines: the record glued behind the torn piece is still read
    path.write_text(_line("a") + "\n" + torn + _line("c") + "\n")
    records, bad = read(path)
    assert [r["run_id"] for r in records] == ["a", "c"] and bad == 1


def test_pgolf_ledger_skips_malformed_records_with_a_warning(tmp_path, capsys):
    """Lines that parse but are not ledger records (wrong types where the table needs numbers or text) are
    counted as unreadable instead of failing the listing."""
    path = tmp_path / "ledger.jsonl"
    lines = [
        _line("good", val_loss=2.5, bytes_total=1000, artifact={"sha256": "cd" * 32}),
        _line("x", seed=[1]), _line("x", artifact="zzz"), _line("x", val_loss="2.5"), _line("x", seed=True),
        _line("x", restart="1"), "[1, 2]", "\xff\xfe not json", _line("x", recipe_sha256=5),
    ]
    path.write_text("\n".join(lines) + "\n")
    assert main(["ledger", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: 1 runs" in out and "good" in out and "2.50000" in out and "1,000" in out
    assert err == f"warning: {path}: 8 unreadable line(s) skipped\n"
    for bad in (tmp_path, tmp_path / "missing.jsonl"):
        assert main(["ledger", "--file", str(bad)]) == 2
        (line,) = _errors(capsys.readouterr().err)
        assert line.startswith(f"error: {bad}: ")


def test_a_finished_runs_line_is_written_before_its_directory_is_committed(cli, small_data, tmp_path, monkeypatch):
    """When the rename that commits a finished run starts, its ledger line (pointing at where the run will be) is
    already on disk: a kill between the two leaves a line, never a finished run without one."""
    runs = tmp_path / "runs"
    real = rundir_module.RunDir.finish
    seen = []

    def finish(self):
        seen.append(((runs / "ledger.jsonl").read_text(), self.path.name, self.final.exists()))
        return real(self)

    monkeypatch.setattr(rundir_module.RunDir, "finish", finish)
    code, err = cli(_argv(small_data, runs, "run.iterations=2", run_id="r"))
    assert code == 0, err
    ((ledger, working, committed),) = seen
    (record,) = [json.loads(line) for line in ledger.splitlines()]
    assert (working, committed) == ("r.partial", False)
    assert record["status"] == "complete" and record["run_dir"] == str(runs / "r") and record["artifact"]["bytes"] > 0
    assert (runs / "ledger.jsonl").read_text() == ledger and (runs / "r" / "summary.json").is_file()


def test_signals_during_the_commit_wait_for_it(cli, small_data, tmp_path, monkeypatch):
    """Two Ctrl-Cs while the finished run is being committed: the commit completes (line, rename), the report
    is skipped, exit 130."""
    runs = tmp_path / "runs"
    real = ledger_module.append

    def interrupted_append(path, record):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(path, record)

    monkeypatch.setattr(ledger_module, "append", interrupted_append)
    code, err = cli(_argv(small_data, runs, "run.iterations=2", run_id="r"))
    assert code == 130 and "Traceback" not in err
    assert _errors(err) == [f"error: SIGINT arrived after the run was committed; it is complete, its report was skipped (pgolf report {runs / 'r'})"]
    (record,) = [json.loads(line) for line in (runs / "ledger.jsonl").read_text().splitlines()]
    assert record["status"] == "complete" and (runs / "r" / "summary.json").is_file() and not (runs / "r.partial").exists()


def test_a_ledger_that_cannot_be_written_never_changes_the_outcome(cli, small_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ledger_module, "_write", full)
    code, err = cli(_argv(small_data, runs, "run.iterations=1", run_id="r"))
    assert code == 0 and f"warning: ledger not written: disk full while writing {runs / 'ledger.jsonl'};" in err
    assert (runs / "r" / "summary.json").is_file() and (runs / "ledger.jsonl").read_bytes() == b""
