"""The run as a person at a terminal sees it: one progress line (steps, tokens/s, loss, ETA against the cap).

Only rank 0 draws, and only on an interactive terminal; elsewhere (CI, files, pipes, torchrun's other
ranks) the console gets the plain log lines, exactly as ``log.txt``. The bar is an ordinary loop observer
(the ``pgolf_on_*`` hooks), registered for the run by ``attach``: nothing in the training loop knows about it.
While it is shown, per-step ``train_loss`` lines go only to ``log.txt`` (the bar shows the latest one);
every other log line is printed above the bar.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .hookspecs import hookimpl

TRAIN_LINE = re.compile(r"^step:(?P<step>\d+)/\d+ train_loss:(?P<loss>\S+)")


def interactive(stream: TextIO) -> bool:
    """A terminal a person watches: a TTY, not ``TERM=dumb``, and not switched off with ``PGOLF_PROGRESS=0``."""
    if os.environ.get("PGOLF_PROGRESS", "") == "0" or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def rate(tokens_per_s: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{unit}"
    return f"{tokens_per_s:.0f}"


class ProgressBar:
    """Draws ``[#####.....] step 1234/20000 · 812k tok/s · loss 2.4312 · 1m40s, ETA 8m20s (cap)``."""

    def __init__(self, stream: TextIO, out: TextIO | None = None, min_interval: float = 0.1, width: int | None = None) -> None:
        self.stream = stream
        self.out = out or stream
        self.min_interval = min_interval
        self.width = width
        self.shown = False
        self.active = False
        self._last_draw = 0.0
        self._line = ""
        self._loss: tuple[int, float] | None = None  # (step, loss) of the last train line logged

    # -- loop observers -------------------------------------------------------------------------------
    @hookimpl
    def pgolf_on_train_start(self, state: Any) -> None:
        self.active = True
        self.update(state, force=True)

    @hookimpl
    def pgolf_on_step_end(self, state: Any) -> None:
        self.update(state)

    @hookimpl
    def pgolf_on_train_end(self, state: Any) -> None:
        self.update(state, force=True)
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = self.active = False

    # -- drawing --------------------------------------------------------------------------------------
    def render(self, state: Any) -> str:
        step, total = int(state.step), max(int(state.iterations), 1)
        elapsed_s = float(state.train_time_ms) / 1000.0
        tokens = state.stack.data.train_batch_tokens
        parts = [f"step {step}/{total}"]
        if step > 0 and elapsed_s > 0:
            parts.append(f"{rate(step * tokens / elapsed_s)} tok/s")
        loss = self._loss[1] if self._loss is not None else state.train_loss
        if loss is not None:
            # Losses are logged every run.train_log_every steps: say which step an older one is from.
            at = f" (step {self._loss[0]})" if self._loss is not None and self._loss[0] != step else ""
            parts.append(f"loss {loss:.4f}{at}")
        eta, capped = self.eta(state)
        parts.append(f"{duration(elapsed_s)}" + (f", ETA {duration(eta)}{' (cap)' if capped else ''}" if eta is not None else ""))
        cap_s = state.stack.run.max_wallclock_seconds
        frac = min(step / total, 1.0)
        if cap_s > 0:
            frac = max(frac, min(elapsed_s / cap_s, 1.0))
        columns = self.width or shutil.get_terminal_size((100, 20)).columns
        text = " · ".join(parts)
        bar_width = max(min(30, columns - len(text) - 4), 0)
        filled = round(frac * bar_width)
        bar = f"[{'#' * filled}{'.' * (bar_width - filled)}] " if bar_width >= 5 else ""
        return (bar + text)[: max(columns - 1, 1)]

    @staticmethod
    def eta(state: Any) -> tuple[float | None, bool]:
        """Seconds left: by steps at the current pace, or by the wallclock cap when that comes first."""
        step, total = int(state.step), int(state.iterations)
        elapsed_s = float(state.train_time_ms) / 1000.0
        by_steps = (total - step) * elapsed_s / step if step > 0 else None
        cap_s = state.stack.run.max_wallclock_seconds
        if cap_s > 0:
            by_cap = max(cap_s - elapsed_s, 0.0)
            if by_steps is None or by_cap < by_steps:
                return by_cap, True
        return by_steps, False

    def update(self, state: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self._line = self.render(state)
        self.stream.write("\r\x1b[K" + self._line)
        self.stream.flush()
        self.shown = True

    def print_above(self, line: str) -> None:
        """Print a log line without tearing the bar: clear it, print, draw it again."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.out.write(line + "\n")
        self.out.flush()
        if self.shown:
            self.stream.write(self._line)
            self.stream.flush()

    def console(self, line: str) -> None:
        """Replacement for the run directory's console printing while the bar is up."""
        m = TRAIN_LINE.match(line)
        if m:
            try:
                self._loss = (int(m.group("step")), float(m.group("loss")))
            except ValueError:
                pass
            if self.active:
                return
        self.print_above(line)

    def close(self) -> None:
        """End the bar's line (a run stopped mid-way: an error or an interrupt is printed next)."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = self.active = False


def attach(registry: Any, rundir: Any, runtime: Any, stream: TextIO | None = None) -> Callable[[], None]:
    """Show a progress bar for this run when rank 0 writes to a terminal; returns the function that removes it."""
    stream = stream or sys.stderr
    if not runtime.is_master or not interactive(stream):
        return lambda: None
    bar = ProgressBar(stream, out=sys.stdout)
    registry.pm.register(bar, name="pgolf:progress")
    rundir.console = bar.console

    def detach() -> None:
        bar.close()
        rundir.console = None
        if registry.pm.is_registered(bar):
            registry.pm.unregister(bar)

    return detach
