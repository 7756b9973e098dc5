"""Seed sweeps: one recipe run under several seeds, one run directory per seed, summarised in ``sweep.json``.

The record test (``pgolf significance``) compares per-seed final losses, so a claim needs the same recipe
under several seeds. ``pgolf sweep STACK --seeds 1337,42,2025`` runs ``pgolf run`` once per seed (a fresh
process each, so every run starts exactly as a lone ``pgolf run`` would, and ``--nproc-per-node`` works as
there), into ``<out_dir>/<sweep_id>/seed_<seed>/``, then writes ``sweep.json`` beside them: the stack, its
overrides, each seed's status and final numbers, and the mean and spread. ``pgolf significance`` accepts
the sweep directory in place of its run directories. The runs' ledger lines go to ``<out_dir>/ledger.jsonl``,
with every other run's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError, DataError

MANIFEST = "sweep.json"


def parse_seeds(text: str) -> list[int]:
    """``"1337,42,2025"`` → ``[1337, 42, 2025]``: integers, each once."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            raise ConfigError(f"--seeds {text}: {part!r} is not an integer; write --seeds 1337,42,2025") from None
        if seed in seeds:
            raise ConfigError(f"--seeds {text}: seed {seed} is listed twice")
        seeds.append(seed)
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seeds; write --seeds 1337,42,2025")
    return seeds


@attrs.define
class Spread:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    min: float
    max: float

    def text(self, digits: int = 5) -> str:
        return f"mean {self.mean:.{digits}f} ± {self.std:.{digits}f} (std, n={self.n}; min {self.min:.{digits}f}, max {self.max:.{digits}f})"


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Spread(n, mean, std, min(values), max(values))


def seed_run_id(seed: int) -> str:
    return f"seed_{seed}"


def find_run_dir(sweep_dir: Path, seed: int) -> Path | None:
    """The seed's run directory as the run left it: finished, ``.failed`` or ``.partial``."""
    name = seed_run_id(seed)
    for candidate in (sweep_dir / name, sweep_dir / f"{name}.failed", sweep_dir / f"{name}.partial"):
        if candidate.is_dir():
            return candidate
    return None


def run_command(args: Any, seed: int, sweep_dir: Path) -> list[str]:
    """The ``pgolf run`` of one seed: the sweep's stack and options, ``--set run.seed=S``, its own run directory."""
    cmd = [sys.executable, "-m", "pgolf_core", "run", args.stack, "--set", f"run.seed={seed}"]
    for expr in args.set or []:
        cmd += ["--set", expr]
    for module in args.plugin or []:
        cmd += ["--plugin", module]
    if args.legacy_env:
        cmd.append("--legacy-env")
    if args.toy:
        cmd.append("--toy")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.debug:
        cmd.append("--debug")
    cmd += ["--out-dir", str(sweep_dir), "--run-id", seed_run_id(seed), "--nproc-per-node", str(args.nproc_per_node)]
    return cmd


def summarize(stack: Any, seeds: list[int], sweep_dir: Path, exit_codes: dict[int, int]) -> dict[str, Any]:
    """The manifest: what ran, each seed's outcome, and the mean and spread of the complete runs."""
    from .report import read_run

    runs = []
    for seed in seeds:
        path = find_run_dir(sweep_dir, seed)
        entry: dict[str, Any] = {"seed": seed, "run_dir": path.name if path else None, "exit_code": exit_codes.get(seed)}
        if path is None:
            entry["status"] = "missing"
        else:
            try:
                run = read_run(path)
            except DataError as exc:
                entry.update(status="unreadable", error="; ".join(exc.problems))
            else:
                entry["status"] = run.status
                if run.error:
                    entry["error"] = run.error
                if run.status == "complete":
                    entry.update(val_loss=run.final_loss, val_bpb=run.final_bpb, score_line=run.summary.get("score_line"))
        runs.append(entry)
    done = [r for r in runs if r["status"] == "complete" and r.get("val_loss") is not None]
    out: dict[str, Any] = {
        "stack": stack.path,
        "name": stack.meta.name,
        "overrides": list(stack.overrides),
        "toy": bool(stack.toy),
        "seeds": seeds,
        "runs": runs,
    }
    for metric in ("val_loss", "val_bpb"):
        s = spread([r[metric] for r in done])
        out[metric] = attrs.asdict(s) if s else None
    return out


def write_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> Path:
    from .rundir import atomic_write

    path = sweep_dir / MANIFEST
    atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return path


def run_sweep(
    args: Any, stack: Any, seeds: list[int], sweep_dir: Path, echo: Callable[[str], None], runner: Callable[..., int] | None = None
) -> tuple[dict[str, Any], int]:
    """Run every seed (a failed seed does not stop the others); returns the manifest and the sweep's exit code
    (0 when every seed completed, else the first failing seed's)."""
    # The runs' own console lines go to stderr, so the sweep's stdout is its summary alone (for scripts).
    runner = runner or (lambda cmd, env: subprocess.call(cmd, env=env, stdout=sys.stderr))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PGOLF_LEDGER", str(sweep_dir.parent / "ledger.jsonl"))  # beside the out_dir's other runs
    codes: dict[int, int] = {}
    for i, seed in enumerate(seeds, start=1):
        if find_run_dir(sweep_dir, seed) is not None:
            echo(f"sweep: seed {seed} ({i}/{len(seeds)}) already has a run directory in {sweep_dir}; kept")
            continue
        echo(f"sweep: seed {seed} ({i}/{len(seeds)}) -> {sweep_dir / seed_run_id(seed)}")
        codes[seed] = runner(run_command(args, seed, sweep_dir), env)
        write_manifest(sweep_dir, summarize(stack, seeds, sweep_dir, codes))  # progress survives an interrupted sweep
    manifest = summarize(stack, seeds, sweep_dir, codes)
    write_manifest(sweep_dir, manifest)
    failed = [r for r in manifest["runs"] if r["status"] != "complete"]
    code = next((codes[r["seed"]] for r in failed if codes.get(r["seed"])), 1 if failed else 0)
    return manifest, code


def format_summary(manifest: dict[str, Any], sweep_dir: Path) -> list[str]:
    lines = [f"sweep {sweep_dir}: {manifest['name'] or manifest['stack']}, {len(manifest['runs'])} seed(s)"]
    for r in manifest["runs"]:
        if r["status"] == "complete":
            lines.append(f"  seed {r['seed']:>6}  val_loss {r['val_loss']:.8f}  val_bpb {r['val_bpb']:.8f}  {r['run_dir']}")
        else:
            lines.append(f"  seed {r['seed']:>6}  {r['status']}" + (f": {r['error']}" if r.get("error") else "") + (f"  {r['run_dir']}" if r["run_dir"] else ""))
    for metric in ("val_loss", "val_bpb"):
        s = manifest.get(metric)
        if s:
            lines.append(f"{metric}: " + Spread(**s).text())
    if not manifest.get("val_loss"):
        lines.append("no seed completed")
    lines.append(f"significance: pgolf significance {sweep_dir} --baseline OTHER_SWEEP_OR_RUNS")
    return lines


def expand_runs(paths: Sequence[str], warn: Callable[[str], None]) -> list[str]:
    """Run directories for ``pgolf significance``: a sweep directory stands for its complete seeds' runs."""
    out = []
    for value in paths:
        path = Path(value)
        manifest = path / MANIFEST
        if not manifest.is_file():
            out.append(value)
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest}: not valid JSON ({exc.msg}); the sweep directory is damaged") from None
        for r in data.get("runs", []):
            if r.get("status") == "complete" and r.get("run_dir"):
                out.append(str(path / r["run_dir"]))
            else:
                warn(f"{path}: seed {r.get('seed')} is {r.get('status')}; left out")
    return out
