"""Checkpoints inside the run directory, so that a killed run resumes into the same run.

Layout: ``<run dir>/checkpoints/step_<N>/rank<r>.pt`` (one file per rank: its model, optimizer, data-stream,
technique and RNG state) and ``COMPLETE.json``, written by rank 0 last, with the world size and each rank
file's sha256. Every file is written under a temporary name and renamed (a full disk leaves the previous
checkpoint as it was and fails with a one-line ``DiskFullError``). A checkpoint without
``COMPLETE.json``, or whose files do not match their recorded hashes, is torn: it is refused, and the
previous complete one is used. Older checkpoints are deleted only after a newer one is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import DataError, DiskFullError, disk_full, disk_full_error
from .rundir import atomic_write
from .runtime import Runtime

DIRNAME = "checkpoints"
MARKER = "COMPLETE.json"


def _step_dir(run_path: Path, step: int) -> Path:
    return run_path / DIRNAME / f"step_{step:08d}"


def save(run_path: Path, step: int, state: dict[str, Any], runtime: Runtime) -> Path:
    """Write this rank's state for ``step``; rank 0 commits the checkpoint once every rank has written."""
    target = _step_dir(run_path, step)
    if (target / MARKER).is_file():  # this step is already committed (e.g. saved again right after a resume)
        runtime.barrier()
        return target
    buf = io.BytesIO()
    torch.save(state, buf)
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
    """The newest complete checkpoint directory, or None."""
    root = run_path / DIRNAME
    complete = [d for d in sorted(root.glob("step_*")) if (d / MARKER).is_file()] if root.is_dir() else []
    return complete[-1] if complete else None


def load(directory: Path, runtime: Runtime) -> dict[str, Any]:
    meta = json.loads((directory / MARKER).read_text())
    if meta["world_size"] != runtime.world_size:
        raise DataError(
            f"{directory}: written by {meta['world_size']} processes, this run has {runtime.world_size}; "
            f"resume with --nproc-per-node {meta['world_size']}"
        )
    path = directory / f"rank{runtime.rank}.pt"
    try:
        data = path.read_bytes()
    except OSError:
        raise DataError(f"{path}: missing; the checkpoint is torn, delete {directory} to resume from an older one") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"][runtime.rank]:
        raise DataError(f"{path}: contents do not match the recorded sha256; the checkpoint is torn, delete {directory}")
    return torch.load(io.BytesIO(data), map_location=runtime.device, weights_only=False)
