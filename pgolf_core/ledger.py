"""The run ledger: one JSON line per finished or failed run, appended to ``<out_dir>/ledger.jsonl``.

A line says what ran (stack path, the sha256 of its resolved TOML, the recipe hash that ignores the seed and
run directory, seed, pgolf version, git commit of pgolf's source tree, installed plugin distributions), how
it ended (status, the error line) and what it produced (final numbers, artifact sha256 and bytes).

An append is a whole line or nothing: rank 0 takes an exclusive ``flock`` on the file, makes sure the file
ends with a newline (a line torn by a crash elsewhere is closed, not glued to the next record), writes the
line with a single ``write`` on an ``O_APPEND`` descriptor and ``fsync``s; a short write (a full disk) is cut
off again with ``ftruncate``. Readers skip a torn or foreign line and still find a record glued behind it.
``pgolf ledger`` prints the file grouped by recipe, with the seeds each recipe ran with, so a recipe whose
seeds did not all complete shows.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError

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


def make_record(
    stack: Any, registry: Any, run_dir: Path | None, run_id: str, status: str, error: str | None = None,
    recorded_dir: Path | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's line, read from ``run_dir``; ``recorded_dir`` is where the run will be once committed (the
    line of a finished run is written before its directory is renamed, so that a finished run always has one)."""
    from .config.dump import stack_to_toml

    stack_file = run_dir / "stack.toml" if run_dir is not None else None
    resolved = stack_file.read_bytes() if stack_file is not None and stack_file.is_file() else stack_to_toml(stack).encode()
    record: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": run_id,
        "status": status,
        "run_dir": str(recorded_dir or run_dir) if run_dir is not None else None,
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
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") is not None:
        from .procenv import attempt_or_zero

        record["restart"] = attempt_or_zero()
    if error:
        record["error"] = error
    record.update(extra or {})
    summary_file = run_dir / "summary.json" if run_dir is not None else None
    summary = _json_object(summary_file) if summary_file is not None else None
    if summary is not None:
        final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
        score = summary.get("score_line") or (list(final)[-1] if final else None)
        record["final"] = {name: {"val_loss": v.get("val_loss"), "val_bpb": v.get("val_bpb")} for name, v in final.items() if isinstance(v, dict)}
        if score in record["final"]:
            record["val_loss"], record["val_bpb"] = final[score].get("val_loss"), final[score].get("val_bpb")
        for key in ("steps", "train_time_ms", "model_params", "bytes_code", "bytes_model", "bytes_total", "nonfinite_skips"):
            if key in summary:
                record[key] = summary[key]
    artifacts = sorted(run_dir.glob("final_model.*.ptz")) if run_dir is not None and run_dir.is_dir() else []
    if artifacts:
        record["artifact"] = {"file": artifacts[0].name, "sha256": _sha256(artifacts[0]), "bytes": artifacts[0].stat().st_size}
    return record


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one line, whole or not at all (see the module's docstring)."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock(fd)
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line  # close a line torn by a crash, so this record stands on its own
            try:
                written = _write(fd, line)
            except OSError:
                _cut(fd, end)
                raise
            if written != len(line):
                _cut(fd, end)
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
    except OSError as exc:
        from .rundir import path_error

        raise path_error(exc, path, "append to the ledger") or exc from None


def _write(fd: int, data: bytes) -> int:
    return os.write(fd, data)


def _lock(fd: int) -> None:
    """Serialise writers on this host (``flock``; a file system without it still gets O_APPEND's atomic writes)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass


def _cut(fd: int, size: int) -> None:
    """Remove what a failed append wrote (the lock keeps other writers of this host from having appended since)."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


# Fields a record must carry with these types to be shown; anything else is an unreadable line.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "time": (str,), "run_id": (str,), "status": (str,), "run_dir": (str, type(None)), "stack": (str, type(None)),
    "stack_sha256": (str,), "recipe_sha256": (str,), "seed": (int, type(None)), "error": (str, type(None)),
    "val_loss": (int, float, type(None)), "val_bpb": (int, float, type(None)), "bytes_total": (int, type(None)),
    "restart": (int, type(None)), "artifact": (dict, type(None)),
}


def _valid(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    for key, types in FIELD_TYPES.items():
        value = record.get(key)
        if key in record and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return False
    artifact = record.get("artifact")
    return artifact is None or isinstance(artifact.get("sha256", ""), str)


def _records_in(line: str) -> tuple[list[dict[str, Any]], int]:
    """The record of a line, or, when a torn line was glued to it, the whole record at its end."""
    try:
        return ([rec], 0) if _valid(rec := json.loads(line)) else ([], 1)
    except ValueError:
        pass
    for start in (i for i, c in enumerate(line) if c == "{" and i > 0):
        try:
            rec = json.loads(line[start:])
        except ValueError:
            continue
        return ([rec], 1) if _valid(rec) else ([], 1)
    return [], 1


def read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a ledger file and how many lines (or torn pieces) could not be read."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a ledger file") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no ledger here (runs write it into their out_dir; see --out-dir)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the ledger ({exc.strerror or exc})") from None
    records, bad = [], 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        found, skipped = _records_in(line.strip())
        records += found
        bad += skipped
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
