"""The run ledger: one JSON line per finished or failed run, appended to ``<out_dir>/ledger.jsonl``.

A line says what ran (stack path, the sha256 of its resolved TOML, the recipe hash that ignores the seed and
run directory, seed, pgolf version, git commit of pgolf's source tree, installed plugin distributions), how
it ended (status, the error line) and what it produced (final numbers, artifact sha256 and bytes). Rank 0
appends each line with a single ``write`` on a descriptor opened with ``O_APPEND``, then ``fsync``: lines of
concurrent runs never interleave and a crash never leaves half a line behind another. ``pgolf ledger``
prints the file grouped by recipe, with the seeds each recipe ran with, so a recipe whose seeds did not all
complete shows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, disk_full, disk_full_error

FILENAME = "ledger.jsonl"
ENV = "PGOLF_LEDGER"  # another ledger file; "off" writes none


def ledger_path(out_dir: str | os.PathLike[str]) -> Path | None:
    override = os.environ.get(ENV, "")
    if override.lower() == "off":
        return None
    return Path(override) if override else Path(out_dir) / FILENAME


def recipe_hash(stack: Any) -> str:
    """sha256 of the resolved stack without the keys that differ between repeats of one recipe."""
    from .config.dump import stack_to_dict

    data = stack_to_dict(stack)
    for key in ("seed", "run_id", "out_dir"):
        data.get("run", {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def git_state(directory: Path) -> dict[str, Any] | None:
    """The commit of the git work tree holding ``directory`` and whether tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)} if commit else None


def plugin_versions(registry: Any) -> dict[str, str]:
    return {r.distribution: r.version for r in registry.all()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_record(stack: Any, registry: Any, run_dir: Path | None, run_id: str, status: str, error: str | None = None) -> dict[str, Any]:
    from .config.dump import stack_to_toml

    stack_file = run_dir / "stack.toml" if run_dir is not None else None
    resolved = stack_file.read_bytes() if stack_file is not None and stack_file.is_file() else stack_to_toml(stack).encode()
    record: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": run_id,
        "status": status,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "stack": stack.path,
        "name": stack.meta.name,
        "overrides": list(stack.overrides),
        "toy": bool(getattr(stack, "toy", ())),
        "stack_sha256": hashlib.sha256(resolved).hexdigest(),
        "recipe_sha256": recipe_hash(stack),
        "seed": stack.run.seed,
        "pgolf": __version__,
        "python": sys.version.split()[0],
        "git": git_state(Path(__file__).resolve().parent.parent),
        "plugins": plugin_versions(registry),
    }
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        record["restart"] = int(restart or 0)
    if error:
        record["error"] = error
    summary_file = run_dir / "summary.json" if run_dir is not None else None
    if summary_file is not None and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        final = summary.get("final", {})
        score = summary.get("score_line") or (list(final)[-1] if final else None)
        record["final"] = {name: {"val_loss": v.get("val_loss"), "val_bpb": v.get("val_bpb")} for name, v in final.items()}
        if score in final:
            record["val_loss"], record["val_bpb"] = final[score].get("val_loss"), final[score].get("val_bpb")
        for key in ("steps", "train_time_ms", "model_params", "bytes_code", "bytes_model", "bytes_total", "nonfinite_skips"):
            if key in summary:
                record[key] = summary[key]
    artifacts = sorted(run_dir.glob("final_model.*.ptz")) if run_dir is not None and run_dir.is_dir() else []
    if artifacts:
        record["artifact"] = {"file": artifacts[0].name, "sha256": _sha256(artifacts[0]), "bytes": artifacts[0].stat().st_size}
    return record


def append(path: Path, record: dict[str, Any]) -> None:
    """One line, one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if disk_full(exc):
            raise disk_full_error(path) from None
        raise


def read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a ledger file and how many lines could not be read."""
    if not path.is_file():
        raise ConfigError(f"{path}: no ledger here (runs write it into their out_dir; see --out-dir)")
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _variant(record: dict[str, Any]) -> str:
    """``--toy --set k=v ...`` of a run (its seed override aside: seeds are the group's subject)."""
    sets = [o for o in record.get("overrides") or [] if not str(o).replace(" ", "").startswith("run.seed=")]
    return " ".join((["--toy"] if record.get("toy") else []) + [f"--set {o}" for o in sets])


def format_table(records: list[dict[str, Any]]) -> str:
    """Runs grouped by recipe (first seen first), each group headed by its stack, hash and seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("recipe_sha256") or rec.get("stack_sha256")), []).append(rec)
    out = []
    for digest, recs in groups.items():
        stacks = sorted({str(r.get("stack")) for r in recs})
        seeds = sorted({r.get("seed") for r in recs if r.get("seed") is not None})
        done = sorted({r.get("seed") for r in recs if r.get("status") == "complete" and r.get("seed") is not None})
        missing = [s for s in seeds if s not in done]
        note = f"; no complete run for seed {', '.join(map(str, missing))}" if missing else ""
        variants = sorted({_variant(r) for r in recs} - {""})
        how = f"  ({'; '.join(variants)})" if variants else ""
        out.append(f"recipe {digest[:12]}  {', '.join(stacks)}{how}  seeds: {', '.join(map(str, seeds)) or '-'}{note}")
        out.append(f"  {'time':<20} {'run_id':<32} {'seed':>6} {'status':<11} {'val_loss':>10} {'val_bpb':>10} {'bytes_total':>12}  artifact")
        for r in recs:
            artifact = (r.get("artifact") or {}).get("sha256", "")[:12] or "-"
            status = str(r.get("status", "?")) + (f"@{r['restart']}" if r.get("restart") else "")
            out.append(
                f"  {str(r.get('time', '-')):<20} {str(r.get('run_id', '-')):<32} {str(r.get('seed', '-')):>6} {status:<11} "
                f"{_num(r.get('val_loss'), '.5f'):>10} {_num(r.get('val_bpb'), '.5f'):>10} {_num(r.get('bytes_total'), ','):>12}  {artifact}"
            )
            if r.get("error"):
                out.append(f"    error: {r['error']}")
    return "\n".join(out) + ("\n" if out else "")
