"""``tools/gpu_check.sh``, the device check, rehearsed on CPU: ``--cpu-dry-run`` runs the same pgolf commands at
tiny sizes and writes its rows into a copy of docs/performance.md. The reference scripts need CUDA, so a CPU
stand-in prints their log lines here; what it was given (the stack's ``--as-env`` environment) is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

STAND_IN = textwrap.dedent(
    """
    import json, os
    n = int(os.environ["ITERATIONS"])
    json.dump({k: v for k, v in os.environ.items() if k.isupper()}, open(os.environ["STAND_IN_OUT"] + "_" + os.environ["NUM_LAYERS"] + ".json", "w"))
    for s in range(1, n + 1):
        print(f"step:{s}/{n} train_loss:{7 - 0.25 * s:.4f} train_time:{30 * s}ms step_avg:30.00ms", flush=True)
    print(f"step:{n}/{n} val_loss:6.5000 val_bpb:3.9000 train_time:{30 * n}ms step_avg:30.00ms")
    print("peak memory allocated: 0 MiB reserved: 0 MiB", flush=True)
    """
)


def test_the_dry_run_writes_every_row_into_a_copy(tmp_path):
    ref = tmp_path / "ref.py"
    ref.write_text(STAND_IN)
    doc_before = (REPO / "docs" / "performance.md").read_bytes()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "STAND_IN_OUT": str(tmp_path / "seen"), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out), "--baseline-ref", str(ref), "--pr400-ref", str(ref)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (REPO / "docs" / "performance.md").read_bytes() == doc_before  # a dry run leaves the document alone

    text = (out / "performance.md").read_text()
    table = text.split(gpu_check.BEGIN)[1].split(gpu_check.END)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [(gpu_check.RUN_CHECK, s) for s in gpu_check.RUN_STACKS] + [
        (gpu_check.BENCH_CHECK, s) for s in gpu_check.BENCH_STACKS
    ]
    for r in rows:
        assert r[2].endswith("(CPU dry run)") and r[3] == "CPU dry run" and r[5] == "SDPA", r
        assert r[-1].startswith("ok"), r
        assert float(r[7]) > 0  # pgolf's step_avg
    runs, benches = rows[:3], rows[3:]
    assert all(r[6] == "2" and "val_bpb" in r[-1] and "(max RSS)" in r[10] for r in runs)
    sliding = {r[1]: r[-1] for r in runs}
    assert "final_int8_zlib_roundtrip val_bpb" in sliding["baseline"] and "final_int6_sliding_window val_bpb" in sliding["pr1392"]
    for r in benches:
        assert r[6] == "2" and r[8] == "30.00" and float(r[9]) == pytest.approx(float(r[7]) / 30.0, rel=1e-2)

    details = json.loads((out / "gpu_check.json").read_text())["details"]
    assert len(details) == 5 and all(d["result"].startswith("ok") for d in details)
    # The reference got the stack's environment: PR #400's averaging switches among it.
    seen = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("seen_*.json")}
    pr400 = json.loads((out / "bench_pr400.json").read_text())["reference"]["env"]
    assert pr400["EMA_ENABLED"] == "0" and pr400["SWA_ENABLED"] == "1" and pr400["TIGHT_SWA"] == "1"
    assert any(s.get("TIGHT_SWA") == "1" and s["ITERATIONS"] == "2" for s in seen.values())
    assert {"gpu_check.log", "gpu_check.json", "performance.md", "bench_baseline.json", "bench_pr400.json"} <= {p.name for p in out.iterdir()}


def test_rows_replace_their_own_and_keep_the_others():
    doc = f"intro\n{gpu_check.BEGIN}\n{gpu_check.HEADER}\n|---|\n| a | x | old |\n| b | y | keep |\n{gpu_check.END}\nafter\n"
    new = gpu_check.update_doc(doc, [["a", "x", "new"], ["c", "z", "added"]])
    lines = new.split(gpu_check.BEGIN)[1].split(gpu_check.END)[0].strip().splitlines()
    assert lines[2:] == ["| a | x | new |", "| b | y | keep |", "| c | z | added |"]
    assert new.startswith("intro\n") and new.endswith(f"{gpu_check.END}\nafter\n")
    with pytest.raises(gpu_check.CheckError, match="no '<!-- gpu_check:begin -->'"):
        gpu_check.update_doc("no table here", [["a", "x", "y"]])


def test_the_document_has_the_table_with_every_check():
    text = (REPO / "docs" / "performance.md").read_text()
    table = text.split(gpu_check.BEGIN)[1].split(gpu_check.END)[0].strip().splitlines()
    assert table[0] == gpu_check.HEADER
    keys = [tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in table[2:]]
    assert keys == [(gpu_check.RUN_CHECK, s) for s in gpu_check.RUN_STACKS] + [(gpu_check.BENCH_CHECK, s) for s in gpu_check.BENCH_STACKS]


def test_without_a_gpu_the_device_mode_says_so_in_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: no CUDA device here; run it on the GPU machine, or rehearse it with --cpu-dry-run"]


def test_a_command_past_its_deadline_is_stopped_with_what_it_started(tmp_path):
    """A phase that runs out of time is ended, its process group with it (pgolf and the reference it launched)."""
    marker = tmp_path / "child.pid"
    job = gpu_check.Job(["bash", "-c", f"sleep 60 & echo $! > {marker}; wait"], tmp_path / "job.log", dict(os.environ), tmp_path)
    job.finish(deadline=time.monotonic() + 1.0)
    assert job.timed_out and job.failure().startswith("timed out after")
    assert job.wall_s < 15
    stat = Path(f"/proc/{int(marker.read_text())}/stat")
    for _ in range(50):  # the background child went with the group: gone, or a zombie nobody has reaped yet
        if not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child outlived the stopped group")
