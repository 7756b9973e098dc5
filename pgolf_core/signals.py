"""SIGTERM and SIGINT during ``pgolf run``: what each phase does with them.

A run installs one ``SignalGuard`` for its whole life. It follows the run through the loop events
(``pgolf_on_train_start`` / ``pgolf_on_train_end``) and decides by phase:

* **setup** (building, loading data, a checkpoint, warm-up) and **export** (averaging, calibration,
  quantization, compression, the artifact's round trip and the final evaluation): the run stops at once with
  ``StoppedError`` (exit 130). The run directory becomes ``.failed`` and the ledger gets an ``interrupted``
  line; with checkpoints, ``--resume`` continues from the last one.
* **training** with ``--checkpoint-every``: the first signal lets the current step finish, checkpoints it and
  stops (``Interrupted``, exit 130); a second one stops at once, keeping the previous checkpoint. Without
  checkpoints there is nothing to save, and the first signal stops at once.
* **cleanup and commit** (marking the run failed, writing its ledger line, renaming the finished run): signals
  wait (``shield``) until the directory and the ledger agree, so a double Ctrl-C never drops the ledger line
  or prints a traceback. After a run is committed, a signal only skips its report; the exit code is 130.

Only the first signal raises: every later one is recorded, so cleanup is never interrupted by a second
Ctrl-C. Under torchrun every worker gets the signal (the terminal's process group, or torchrun forwarding
SIGTERM), and the training-phase stop is agreed across ranks with one all-reduce per step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

from .errors import StoppedError
from .hookspecs import hookimpl

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PHASES = {
    "setup": "before training (setup)",
    "train": "training",
    "export": "after training (export and final evaluation)",
    "commit": "while the run was being committed",
    "report": "while the report was being written",
}


class SignalGuard:
    """The run's SIGTERM/SIGINT handler; ``graceful``: training stops after a checkpointed step."""

    def __init__(self, runtime: Any = None, graceful: bool = False) -> None:
        self.runtime = runtime
        self.graceful = graceful
        self.phase = "setup"
        self.step = 0
        self.received: list[str] = []
        self.requested = False  # a signal asked to stop (the training loop's flag)
        self.thrown = False  # a StoppedError left the handler: later signals are only recorded
        self.opened = False  # the run directory exists (before that, a stop leaves nothing behind)
        self._shield = 0
        self._saved: dict[int, Any] = {}

    # -- installation -------------------------------------------------------------------------------------
    def install(self) -> "SignalGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers live in the main thread; an embedded caller keeps its own
        for sig in SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    @contextlib.contextmanager
    def shield(self, deliver: bool = False) -> Iterator[None]:
        """Signals inside wait: they are recorded, never raised (cleanup and commit must finish). ``deliver``:
        a signal that waited is acted on when the block has completed (a step that must not be cut in half,
        after which the run goes on)."""
        self._shield += 1
        before = len(self.received)
        try:
            yield
        finally:
            self._shield -= 1
        if deliver and len(self.received) > before and self._shield == 0 and not self.thrown:
            self.requested = self.thrown = True
            raise self.error(self.received[before])

    # -- the handler ------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        try:
            print(f"pgolf: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.thrown or (self._shield and self.requested):
            self._say(f"{name}: already stopping; finishing the run directory and its ledger line first")
            return
        if self._shield:
            self._say(f"{name}: stopping as soon as the run directory and its ledger line agree")
            return
        if self.phase == "train" and self.graceful and not self.requested:
            self.requested = True
            self._say(f"{name}: stopping after this step (it will be checkpointed); a second signal stops at once")
            return
        self.requested = self.thrown = True
        raise self.error(name)

    def error(self, name: str) -> StoppedError:
        where = PHASES.get(self.phase, self.phase)
        if self.phase == "train":
            where += f" at step {self.step}"
        if not self.opened:
            hint = "nothing was written"
        elif self.graceful:
            hint = "continue with --resume RUN_DIR from the last checkpoint"
        else:
            hint = "the run had no checkpoints (--checkpoint-every N lets --resume continue a stopped run)"
        return StoppedError(f"stopped by {name} {where}; {hint}")

    # -- the training loop's stop flag (``stop_requested``) -------------------------------------------------
    def __call__(self) -> bool:
        """After each step: stop now? Agreed across ranks, so that all of them checkpoint the same step."""
        if self.runtime is None or not self.runtime.distributed:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor(int(self.requested), device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- loop events (registered as a pluggy observer) -------------------------------------------------------
    @hookimpl
    def pgolf_on_train_start(self, state: Any) -> None:
        self.phase = "train"
        self.step = int(getattr(state, "step", 0) or 0)

    @hookimpl
    def pgolf_on_step_end(self, state: Any) -> None:
        self.step = int(getattr(state, "step", 0) or 0)

    @hookimpl
    def pgolf_on_train_end(self, state: Any) -> None:
        self.phase = "export"
        if self.requested and not self.thrown and self._shield == 0:  # asked to stop during the last validation
            self.thrown = True
            raise self.error(self.received[0] if self.received else "a signal")

    def attach(self, registry: Any) -> Any:
        """Observe the loop through ``registry``'s plugin manager; returns the undo."""
        registry.pm.register(self, name="pgolf:signals")

        def detach() -> None:
            if registry.pm.is_registered(self):
                registry.pm.unregister(self)

        return detach
