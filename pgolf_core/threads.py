"""CPU threads for a run: no more than the machine has free.

PyTorch starts one intra-op thread per core. On a machine other jobs keep busy, those threads spin-wait
for cores they do not get, and a toy run that takes 14 s with one thread takes minutes. torchrun avoids
this for several processes by giving each one thread; pgolf does the same for its own processes and, for a
single process, takes the cores that are free: the cores this process may use, less the 1-minute load
average (the other jobs' demand), shared among the local processes, at least one. ``--threads N``,
``PGOLF_THREADS`` or ``OMP_NUM_THREADS`` decide instead. Only CPU runs are changed; on CUDA the CPU threads
only feed the GPU.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError
from .hookspecs import hookimpl


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose(requested: int | None = None, processes: int | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``(threads, why)`` for one process of this machine."""
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads {requested}: must be >= 1")
        return requested, "--threads"
    for name in ("PGOLF_THREADS", "OMP_NUM_THREADS"):
        raw = env.get(name, "").strip()
        if raw:
            try:
                n = int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: expected a positive number of threads") from None
            if n < 1:
                raise ConfigError(f"{name}={raw!r}: expected a positive number of threads")
            return n, name
    if processes is None:
        processes = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    processes = max(processes, 1)
    cores, load = available_cores(), load_average()
    n = max(1, min(cores // processes, round((cores - load) / processes)))
    return n, f"{cores} cores, load {load:.1f}, {processes} process{'es' if processes > 1 else ''}; --threads N to choose"


def uses_cpu(stack: Any) -> bool:
    if stack.run.device == "cpu":
        return True
    if stack.run.device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def configure(stack: Any, requested: int | None = None) -> str | None:
    """Set torch's intra-op threads for a CPU run; returns the line that reports them (None on CUDA, where the
    thread count is left alone unless ``--threads`` asks)."""
    if not uses_cpu(stack) and requested is None:
        return None
    import torch

    n, why = choose(requested)
    torch.set_num_threads(n)
    return f"threads:{n} ({why})"


class ThreadsLine:
    """Writes the threads line into the run's log when training starts (beside device and dtype)."""

    def __init__(self, line: str) -> None:
        self.line = line

    @hookimpl
    def pgolf_on_train_start(self, state: Any) -> None:
        state.log(self.line)


def attach(registry: Any, line: str | None):
    """Log ``line`` at the start of training; returns the function that removes the observer."""
    if not line:
        return lambda: None
    observer = ThreadsLine(line)
    registry.pm.register(observer, name="pgolf:threads")

    def detach() -> None:
        if registry.pm.is_registered(observer):
            registry.pm.unregister(observer)

    return detach
