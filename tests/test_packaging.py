"""A wheel of pgolf installed (not editable) in a fresh environment works from an empty directory: the built-in
techniques under ``pgolf.plugins``, the bundled stacks as package data, the sample data and tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

from conftest import REPO, STACKS


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "OMP_NUM_THREADS")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_installs_and_runs_the_bundled_sample_from_an_empty_directory(tmp_path):
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("pgolf-*.whl")
    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)  # torch and the other dependencies from here
    python = env_dir / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()

    where = _run([str(python), "-c", "import pgolf_core, pgolf.plugins.attention.gqa as g; print(pgolf_core.__file__); print(g.__file__)"], empty)
    assert where.returncode == 0, where.stderr
    assert all(str(env_dir) in line for line in where.stdout.splitlines()), where.stdout  # the wheel's copy, not the repository

    stacks = _run([str(python), "-m", "pgolf", "stacks"], empty)
    assert stacks.returncode == 0, stacks.stderr
    header, *rows = [line for line in stacks.stdout.splitlines() if line and not line.startswith("note:")]
    assert header.split()[0] == "stack"
    assert sorted(line.split()[0] for line in rows) == sorted(p.stem for p in STACKS.glob("*.toml"))

    listing = json.loads(_run([str(python), "-m", "pgolf", "list", "--json"], empty).stdout)
    modules = {t["module"] for t in listing["techniques"] if t["distribution"] == "pgolf"}
    assert modules and all(m.startswith("pgolf.plugins.") for m in modules)

    run = _run([str(python), "-m", "pgolf", "run", "sample", "--run-id", "w", "--set", "run.iterations=2", "--set", "run.val_loss_every=0"], empty)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "final_int8_zlib_roundtrip_exact" in (empty / "runs" / "w" / "log.txt").read_text()
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing else written where the user stands
