"""tools/count_ops.py counts a process's aten ops exactly, so two loops' per-step work compares on a busy machine;
tools/cpu_baseline_reference.py refuses a script it was not written for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = """import os, torch
x = torch.ones(4)
for _ in range(int(os.environ["STEPS"])):
    x = torch.relu(x * 2) + 1
"""


def _count(tmp_path: Path, steps: int, name: str) -> Path:
    out = tmp_path / f"{name}.json"
    env = {"PATH": "/usr/bin:/bin", "STEPS": str(steps), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tools" / "count_ops.py"), str(out), "--", str(tmp_path / "prog.py")], env=env, check=True, timeout=120)
    return out


def test_ops_are_counted_exactly_and_differenced_per_step(tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    long, short = _count(tmp_path, 13, "long"), _count(tmp_path, 3, "short")
    counts = json.loads(long.read_text())
    assert counts["aten.mul"] == 13 and counts["aten.relu"] == 13 and counts["aten.add"] == 13
    same = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "count_ops.py"), "--per-step", "10", str(long), str(short), str(long), str(short)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert same.splitlines() == ["per step: A 3.0, B 3.0"]  # equal programs: no op listed


def test_the_cpu_reference_refuses_another_script(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text("print('not the baseline')\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cpu_baseline_reference.py"), str(script), str(tmp_path / "out.py")], capture_output=True, text=True)
    assert proc.returncode != 0 and "is not the baseline train_gpt.py" in proc.stderr and not (tmp_path / "out.py").exists()
