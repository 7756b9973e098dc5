"""Checkpoints inside the run directory, so that a killed run resumes into the same run.

Layout: ``<run dir>/checkpoints/step_<N>/rank<r>.pt`` (one file per rank: its model, optimizer, data-stream,
technique and RNG state) and ``COMPLETE.json``, written by rank 0 last, with the step, the world size and
each rank file's sha256. Every file is written under a temporary name and renamed (a full disk leaves the
previous checkpoint as it was and fails with a one-line ``DiskFullError``). Older checkpoints are deleted
only after a newer one is complete.

* A checkpoint without ``COMPLETE.json`` is *torn* (the process died while saving it): it is ignored and the
  newest complete one is used.
* A checkpoint whose ``COMPLETE.json`` is damaged or whose files do not match their recorded hashes is
  *damaged* (changed after it was committed): resuming from it is refused with one line naming the file, and
  never falls back silently to an older state; deleting that step directory resumes from the one before.

Loading never runs code from the file: ``torch.load(weights_only=True)`` unpickles only tensors, numbers,
strings and containers (``ALLOWED``). numpy arrays and scalars (the RNG state) are stored as tensors plus
their dtype (``_encode``/``_decode``), so no numpy reconstructor needs to be allowed; a state holding any
other object is refused when it is saved, not when a resume needs it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import DataError, DiskFullError, disk_full, disk_full_error
from .rundir import atomic_write
from .runtime import Runtime

DIRNAME = "checkpoints"
MARKER = "COMPLETE.json"
STEP_DIR = re.compile(r"step_(\d{8,})")
TAG = "__pgolf_numpy__"
ALLOWED = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)
"""What a checkpoint may hold besides dicts, lists and tuples (and numpy values, encoded as tensors)."""


def _step_dir(run_path: Path, step: int) -> Path:
    return run_path / DIRNAME / f"step_{step:08d}"


def _encode(value: Any, where: str = "state") -> Any:
    """The state with numpy values as tagged tensors; anything ``weights_only`` could not load back is refused."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"checkpoint {where}: a numpy array of Python objects cannot be stored")
        raw = np.ascontiguousarray(value)
        data = torch.from_numpy(raw.reshape(-1).view(np.uint8).copy())
        return {TAG: "ndarray", "dtype": raw.dtype.str, "shape": list(raw.shape), "data": data}
    if isinstance(value, np.generic):
        return {TAG: "scalar", "dtype": value.dtype.str, "value": value.item()}
    if isinstance(value, dict):
        out = {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
        return collections.OrderedDict(out) if isinstance(value, collections.OrderedDict) else out
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, ALLOWED):
        return value
    raise TypeError(
        f"checkpoint {where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored; a technique's "
        "state_dict() must hold tensors, numbers, strings, lists and dicts (checkpoints load with weights_only=True)"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        kind = value.get(TAG)
        if kind == "ndarray":
            return value["data"].numpy().view(np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        if kind == "scalar":
            return np.dtype(value["dtype"]).type(value["value"])
        out = {k: _decode(v) for k, v in value.items()}
        return collections.OrderedDict(out) if isinstance(value, collections.OrderedDict) else out
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    return value


def save(run_path: Path, step: int, state: dict[str, Any], runtime: Runtime) -> Path:
    """Write this rank's state for ``step``; rank 0 commits the checkpoint once every rank has written."""
    target = _step_dir(run_path, step)
    if (target / MARKER).is_file():  # this step is already committed (e.g. saved again right after a resume)
        runtime.barrier()
        return target
    buf = io.BytesIO()
    torch.save(_encode(state), buf)
    data = buf.getvalue()
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write(target / f"rank{runtime.rank}.pt", data)
    except (OSError, DiskFullError) as exc:
        if not runtime.distributed:  # a torn step directory is ignored anyway; free what it holds
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, OSError) and disk_full(exc):
            raise disk_full_error(target) from None
        raise
    digest = hashlib.sha256(data).hexdigest()
    digests = [digest]
    if runtime.distributed:
        digests = [None] * runtime.world_size
        dist.all_gather_object(digests, digest)
    if runtime.is_master:
        meta = {"step": step, "world_size": runtime.world_size, "sha256": digests}
        try:
            atomic_write(target / MARKER, (json.dumps(meta, indent=2) + "\n").encode())
        except DiskFullError:
            if not runtime.distributed:
                shutil.rmtree(target, ignore_errors=True)
            raise
        for older in sorted((run_path / DIRNAME).glob("step_*")):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
    runtime.barrier()
    return target


def latest(run_path: Path) -> Path | None:
    """The newest checkpoint directory with a marker (torn ones, without, are skipped), or None."""
    root = run_path / DIRNAME
    try:
        dirs = sorted(d for d in root.iterdir() if STEP_DIR.fullmatch(d.name) and d.is_dir()) if root.is_dir() else []
    except OSError:
        return None
    complete = [d for d in dirs if (d / MARKER).is_file()]
    return max(complete, key=lambda d: int(d.name[5:])) if complete else None


def read_marker(directory: Path) -> dict[str, Any]:
    """``COMPLETE.json``, checked: a damaged marker is one ``DataError`` line, never a traceback."""
    path = directory / MARKER
    hint = f"the checkpoint is damaged; delete {directory} to resume from the one before (or from step 0)"
    try:
        meta = json.loads(path.read_bytes())
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); {hint}") from None
    except ValueError:
        raise DataError(f"{path}: not valid JSON; {hint}") from None
    ok = (
        isinstance(meta, dict)
        and type(meta.get("step")) is int
        and meta["step"] >= 0
        and type(meta.get("world_size")) is int
        and meta["world_size"] >= 1
        and isinstance(meta.get("sha256"), list)
        and len(meta["sha256"]) == meta["world_size"]
        and all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in meta["sha256"])
    )
    if not ok:
        raise DataError(f"{path}: not a checkpoint marker (step, world_size and one sha256 per rank); {hint}")
    if f"step_{meta['step']:08d}" != directory.name:
        raise DataError(f"{path}: says step {meta['step']} in {directory.name}; {hint}")
    return meta


def verify(directory: Path, world_size: int) -> dict[str, Any]:
    """Check a checkpoint before anything is renamed or built: its marker, its world size, every rank file's
    sha256, and that each file loads under ``weights_only`` (a crafted file with a matching hash is refused
    here, not after the run directory was reopened). Returns the marker."""
    meta = read_marker(directory)
    if meta["world_size"] != world_size:
        raise DataError(
            f"{directory}: written by {meta['world_size']} processes, this run has {world_size}; "
            f"resume with --nproc-per-node {meta['world_size']}"
        )
    for rank in range(world_size):
        _safe_load(_checked_bytes(directory, rank, meta), directory / f"rank{rank}.pt", torch.device("cpu"))
    return meta


def _checked_bytes(directory: Path, rank: int, meta: dict[str, Any]) -> bytes:
    path = directory / f"rank{rank}.pt"
    hint = f"delete {directory} to resume from the checkpoint before it (or from step 0)"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); the checkpoint is damaged, {hint}") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"][rank]:
        raise DataError(f"{path}: contents do not match the recorded sha256; the checkpoint is damaged, {hint}")
    return data


def load(directory: Path, runtime: Runtime) -> dict[str, Any]:
    meta = read_marker(directory)
    if meta["world_size"] != runtime.world_size:
        raise DataError(
            f"{directory}: written by {meta['world_size']} processes, this run has {runtime.world_size}; "
            f"resume with --nproc-per-node {meta['world_size']}"
        )
    data = _checked_bytes(directory, runtime.rank, meta)
    return _decode(_safe_load(data, directory / f"rank{runtime.rank}.pt", runtime.device))


def _safe_load(data: bytes, path: Path, device: torch.device) -> Any:
    """Unpickle with ``weights_only=True``: a global outside torch's allowlist is refused, never called."""
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[-1] if lines else type(exc).__name__)
        raise DataError(
            f"{path}: holds what a checkpoint does not ({why[:160]}); it was not written by pgolf or is damaged, and is not loaded"
        ) from None
