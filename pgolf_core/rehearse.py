"""``pgolf rehearse``: the CUDA run's compile behaviour, on the CPU, before a GPU is spent on it.

A run on CUDA differs from a CPU run in its policy, not its code: bf16 autocast with the reference's casts,
and ``torch.compile(fullgraph=True, dynamic=False)`` of the model, the evaluators' functions and (where the
reference compiles it) Newton–Schulz. A fullgraph function that needs more graphs than dynamo's recompile
limit fails the run (``FailOnRecompileLimitHit``), typically in the final evaluation, after the whole
training budget was spent. Dynamo's guards and its limit do not depend on the backend, so the rehearsal runs
the same pipeline (``Trainer``: warm-up, training with every late switch, averaging, calibration, quantize,
compress, round trip, every evaluator) on the CPU under the CUDA policy (``runtime.Policy``) with a cheap
backend (``aot_eager`` traces forward and backward as inductor would, then runs them eagerly; ``eager``
traces only the forward), at a size the CPU manages, and counts, for each function the run compiled:

* graphs: the compiled variants dynamo built for it (its cache entries), each with the guard failure that
  made it recompile and the phase of the run it happened in;
* graph breaks (a fullgraph function cannot have any; the run fails at the first);

from dynamo's own compilation records (``torch._dynamo.utils.get_compilation_metrics``). The rehearsal lets
dynamo go past the stack's limit (``run.recompile_limit``) so that it can say how far over a function goes,
and fails when any function comes within ``MARGIN`` graphs of it: the CUDA run's shapes and switches are the
rehearsal's, but not its sizes, and a function that needs its last allowed graph at toy size has none to
spare for a size that adds a shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

from .config.schema import Stack
from .errors import ConfigError, PgolfError
from .hookspecs import hookimpl
from .toy import ToySize, toy_settings

MARGIN = 2
"""Graphs every compiled function must stay below its recompile limit."""

HEADROOM = 64
"""Graphs dynamo may build beyond the stack's limit during a rehearsal, so that the report can say how far over
a function goes instead of stopping at the first graph past the limit."""

BACKENDS = ("aot_eager", "eager")

REHEARSAL_SIZE = ToySize(warmup_steps=1, val_batch_tokens=1024)
"""The toy (``pgolf_core.toy``: every switch of the recipe at the same fraction of the run), one warm-up step
(it compiles what the first of several would) and validation batches of 1024 tokens."""


def rehearsal_val_tokens(stack: Stack, registry: Any) -> int:
    """Validation tokens a rehearsal evaluates (a slice of the split): one full validation batch of this process and
    half of another, the two shapes a real split gives every evaluator, at a fraction of the time."""
    from .train import build_slot

    seq = max(stack.data.train_seq_len, build_slot(stack, registry, "evaluator").eval_seq_len)
    per_batch = max(stack.data.val_batch_size // stack.run.grad_accum_base // stack.data.train_seq_len, 1)
    return (per_batch + max(per_batch // 2, 1)) * seq + 1


class RehearsalError(PgolfError):
    """A compiled function would hit, or come within ``MARGIN`` graphs of, its recompile limit; or the rehearsed
    pipeline failed."""

    exit_code = 6


@dataclasses.dataclass
class Graph:
    """One compiled variant of a function: when it was built and, for a recompile, the guard each earlier graph
    failed on (``(graph number, guard)``, 1-based; empty for the first graph)."""

    phase: str
    failed_guards: list[tuple[int, str]]
    seconds: float

    def reason(self) -> str:
        """``schedule.active == False (graph 4); grad_mode (graphs 2, 3)``: each guard with the graphs that failed it."""
        by_guard: dict[str, list[int]] = {}
        for number, guard in sorted(self.failed_guards, key=lambda item: -item[0]):
            by_guard.setdefault(guard, []).append(number)
        return "; ".join(
            f"{guard} (graph{'s' if len(numbers) > 1 else ''} {', '.join(str(n) for n in sorted(numbers))})" for guard, numbers in by_guard.items()
        )


@dataclasses.dataclass
class CompiledFunction:
    name: str
    where: str  # file:line of its code
    fullgraph: bool
    limit: int
    graphs: list[Graph] = dataclasses.field(default_factory=list)
    graph_breaks: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)  # compiles dynamo refused (a graph break under fullgraph, ...)

    @property
    def margin(self) -> int:
        return self.limit - len(self.graphs)

    def problem(self) -> str | None:
        """One line when this function breaks the rule, else None."""
        n = len(self.graphs)
        if self.failures:
            return f"{self.name} ({self.where}) does not compile: {self.failures[0]}"
        if n > self.limit:
            then = "the compiled run fails there (FailOnRecompileLimitHit)" if self.fullgraph else "dynamo runs it eagerly from then on"
            return (
                f"{self.name} ({self.where}) builds {n} graphs, {n - self.limit} over run.recompile_limit = {self.limit}: "
                f"{then}; remove the recompiles listed above or raise run.recompile_limit"
            )
        if self.margin < MARGIN:
            short = MARGIN - self.margin
            return (
                f"{self.name} ({self.where}) builds {n} graphs against run.recompile_limit = {self.limit}: {short} past the margin "
                f"of {MARGIN} a rehearsal keeps (a larger run adds shapes); remove the recompiles listed above or raise run.recompile_limit"
            )
        return None


@dataclasses.dataclass
class Rehearsal:
    stack: str
    backend: str
    limit: int
    functions: list[CompiledFunction]
    phases: list[str]  # the phases the run went through, in order
    error: str | None = None  # the rehearsed pipeline's own failure, if it failed
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """One line per function over (or too near) its limit or refused by dynamo, then the pipeline's failure."""
        out = [p for f in self.functions if (p := f.problem()) is not None]
        if self.error is not None and not any(self.error.endswith(p) for p in out):
            out.append(self.error)
        return out

    def function(self, name: str) -> CompiledFunction:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(f"{name!r} was not compiled in the rehearsal of {self.stack} (compiled: {', '.join(f.name for f in self.functions)})")


def rehearsal_stack(
    path: str, registry: Any, overrides: list[str] | tuple[str, ...] = (), size: ToySize | None = None, legacy_env: dict[str, str] | None = None
) -> Stack:
    """The stack at rehearsal size (its toy at ``size``, default ``REHEARSAL_SIZE``, on the CPU), then ``overrides``
    and the legacy environment."""
    from .config import load_stack

    settings, _ = toy_settings(load_stack(path, registry), size or REHEARSAL_SIZE)
    settings += ['run.device="cpu"', 'run.compile="on"']
    return load_stack(path, registry, overrides=list(overrides), legacy_env=legacy_env, toy=settings)


class _Phases:
    """Where the run is, by time: loop events mark training steps and validations (it observes the loop as a
    plugin does), the run's metric records mark the phases after training. Compiles are placed by their start."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, str, str]] = []  # (time in us, phase, kind)
        self.calibrates = False  # the quantizer calibrates after the pre-quantization evaluation
        self.mark("warm-up")

    def mark(self, phase: str, kind: str | None = None) -> None:
        self.marks.append((time.time_ns() // 1000, phase, kind or phase))

    def at(self, t_us: int | None) -> str:
        phase = self.marks[0][1]
        for t, name, _ in self.marks:
            if t_us is not None and t <= t_us:
                phase = name
        return phase

    def kinds(self) -> list[str]:
        """The kinds of phase the run went through, in order of first appearance."""
        return list(dict.fromkeys(kind for _, _, kind in self.marks))

    @hookimpl
    def pgolf_on_step_start(self, state: Any) -> None:
        self.mark(f"train step {state.step + 1}", "training")

    @hookimpl
    def pgolf_on_eval_start(self, state: Any) -> None:
        self.mark(f"validation at step {state.step}", "validation")

    @hookimpl
    def pgolf_on_train_end(self, state: Any) -> None:
        self.mark("averaging and pre-quantization evaluation")

    def metric(self, kind: str, **record: Any) -> None:
        if kind == "prequant":
            self.mark("calibration" if self.calibrates else "quantize, compress and round trip")
        elif kind == "phase" and record.get("name") == "calibration":
            self.mark("quantize, compress and round trip")
        elif kind == "phase" and record.get("name") == "quantize_compress":
            self.mark("final evaluation")


@contextlib.contextmanager
def _dynamo_session(limit: int) -> Iterator[None]:
    """A clean dynamo (no graphs of earlier work in this process), its limit ``limit`` and every compilation
    recorded; afterwards the caches are dropped and the settings restored."""
    import torch._dynamo
    import torch._dynamo.utils as dynamo_utils

    from .runtime import recompile_limit, set_recompile_limit

    saved_limit = recompile_limit()
    saved_metrics_limit = getattr(dynamo_utils, "DEFAULT_COMPILATION_METRICS_LIMIT", 64)
    torch._dynamo.reset()
    dynamo_utils.clear_compilation_metrics()
    set_metrics_limit = getattr(dynamo_utils, "set_compilation_metrics_limit", None)
    if set_metrics_limit is not None:
        set_metrics_limit(max(4096, saved_metrics_limit))
    set_recompile_limit(limit)
    try:
        yield
    finally:
        set_recompile_limit(saved_limit)
        if set_metrics_limit is not None:
            set_metrics_limit(saved_metrics_limit)
        torch._dynamo.reset()


class _GuardFailures:
    """What dynamo reports, for a recompile, about each graph it already had for the function: the first guard
    of that graph that failed (``guard_fail_fn``, ``torch._dynamo.types.GuardFail``), with the time it came."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Any, str]] = []  # (time in us, code object, reason)

    def __call__(self, failure: Any) -> None:
        self.seen.append((time.time_ns() // 1000, failure.orig_code, failure.reason))

    def between(self, code_key: tuple[str, int, str], start_us: int, end_us: int | None) -> list[tuple[int, str]]:
        out = []
        for t, code, reason in self.seen:
            if (code.co_filename, code.co_firstlineno, code.co_name) != code_key or t < start_us or (end_us is not None and t >= end_us):
                continue
            number, guard = _guard(reason)
            if number is not None:
                out.append((number, guard))
        return out


def _guard(reason: str) -> tuple[int | None, str]:
    """``("0/3: self._modules['topology']._modules['schedule'].active == False  # source...", ...)`` -> ``(4,
    "self.topology.schedule.active == False")``: the failing graph's number (1-based) and its guard, readable."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    head, _, rest = text.partition(": ")
    number = int(head.split("/")[1]) + 1 if head.count("/") == 1 and head.replace("/", "").isdigit() else None
    guard = (rest if number is not None else text).split("  # ")[0].strip()
    return number, re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", guard)


def _failure(text: str) -> str:
    """Dynamo's refusal in one line: its first line, the underlying error it names, and the innermost user line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    parts = lines[:1]
    parts += [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Developer debug context:")][:1]
    frames = [ln for ln in lines if ln.startswith('File "')]
    if frames:
        file_part = frames[-1].split('"')
        parts.append(f"at {_where(file_part[1], int(frames[-1].rsplit('line ', 1)[1].split(',')[0]))}" if len(file_part) > 2 and "line " in frames[-1] else frames[-1])
    return "; ".join(parts)


def _functions(compiled: list[tuple[str, Any, bool]], limit: int, phases: _Phases, guards: _GuardFailures) -> list[CompiledFunction]:
    """Group dynamo's compilation records by code object, named by what the run compiled."""
    import torch._dynamo.utils as dynamo_utils

    by_code: dict[tuple[str, int, str], CompiledFunction] = {}
    for name, code, fullgraph in compiled:
        if code is None:
            continue
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        if key not in by_code:
            by_code[key] = CompiledFunction(name, _where(code.co_filename, code.co_firstlineno), fullgraph, limit)
        else:
            f = by_code[key]
            if name not in f.name.split(" = "):
                f.name = f"{f.name} = {name}"  # one code object compiled twice (same graphs cache): both names
            f.fullgraph = f.fullgraph or fullgraph
    records = [r for r in dynamo_utils.get_compilation_metrics() if r.is_forward is not False and not getattr(r, "is_runtime", False)]
    starts = sorted(int(r.start_time_us or 0) for r in records)  # the backward's compile and runtime records describe the same graph
    for record in records:
        key = (record.co_filename or "", record.co_firstlineno or 0, record.co_name or "")
        f = by_code.get(key)
        if f is None:  # compiled without Runtime.compiled (a plugin calling torch.compile itself), or a resumed frame
            f = by_code[key] = CompiledFunction(record.co_name or "?", _where(key[0], key[1]), False, limit)
        f.graph_breaks += int(record.num_graph_breaks or 0)
        if record.fail_type:
            f.failures.append(f"{record.fail_type}: {_failure(record.fail_reason or '')}")
            continue
        if record.has_guarded_code is False:
            continue
        start = int(record.start_time_us or 0)
        end = next((t for t in starts if t > start), None)  # the guard checks of a recompile come inside its compile
        failed = guards.between(key, start, end) if len(f.graphs) else []
        f.graphs.append(Graph(phases.at(start), failed, float(record.entire_frame_compile_time_s or 0.0)))
    return list(by_code.values())


def _where(filename: str, line: int) -> str:
    path = Path(filename)
    for parent in path.parents:
        if parent.name in ("pgolf_core", "plugins", "pgolf"):
            return f"{path.relative_to(parent.parent)}:{line}"
    return f"{path.name}:{line}"


def rehearse(
    stack: Stack,
    registry: Any,
    backend: str = "aot_eager",
    val_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
    bytes_code: int | None = None,
) -> Rehearsal:
    """Run ``stack`` (already at rehearsal size, on the CPU) through the whole pipeline under the CUDA policy
    with ``backend``, in this process; returns what each compiled function needed. Never raises for what it
    finds: a failed pipeline is the result's ``error``. ``bytes_code``: the code size the artifact is accounted
    with (None: the packed ``train_gpt.py``'s, as a run counts it; packing a stack the first time takes seconds
    to minutes, and a tiny model's artifact is far under the cap either way)."""
    from .bench import make_val_slice
    from .contracts import Calibrating
    from .export import code_bytes
    from .finalize import export_and_evaluate
    from .runtime import Policy, set_recompile_limit, setup_runtime
    from .train import Trainer, load_data, resolve_data_paths

    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: a rehearsal compiles with {' or '.join(BACKENDS)}")
    limit = stack.run.recompile_limit
    phases, guards = _Phases(), _GuardFailures()
    lines: list[str] = []

    def run_log(message: str, console: bool = True) -> None:
        lines.append(message)
        if log is not None and console:
            log(message)

    error = None
    t0 = time.perf_counter()
    observer = phases
    registry.pm.register(observer, name="pgolf:rehearse")
    runtime = None
    try:
        with _dynamo_session(limit + HEADROOM), tempfile.TemporaryDirectory(prefix="pgolf-rehearse-") as tmp:
            data_path, tok_path = resolve_data_paths(stack)
            val_tokens = val_tokens or rehearsal_val_tokens(stack, registry)
            if _val_tokens(data_path) > val_tokens:
                data_path = str(make_val_slice(data_path, val_tokens, Path(tmp) / "data"))
            stack = attrs.evolve(stack, data=attrs.evolve(stack.data, path=data_path, tokenizer=tok_path))
            runtime = setup_runtime(stack, Policy(bf16=True, compile=True, backend=backend))
            runtime.guard_fail_fn = guards
            set_recompile_limit(limit + HEADROOM)  # setup_runtime set the stack's own; count past it instead
            try:
                if bytes_code is None:
                    bytes_code = code_bytes(stack, registry)
                data_files = load_data(stack, runtime.device, registry)
                trainer = Trainer(stack, registry, runtime, data_files, run_log, phases.metric)
                phases.calibrates = isinstance(trainer.quantizer, Calibrating)
                trainer.warmup(stack.run.warmup_steps)
                trainer.train()
                export_and_evaluate(trainer, _Files(Path(tmp), run_log), bytes_code)
            except PgolfError as exc:
                error = f"{stack.path}: rehearsal failed in {phases.at(time.time_ns() // 1000)}: {exc.problems[0]}"
            except Exception as exc:  # a compile failure (a graph break under fullgraph, an unsupported op) or a crash
                text = str(exc).strip().splitlines()
                error = (
                    f"{stack.path}: rehearsal failed in {phases.at(time.time_ns() // 1000)}: {type(exc).__name__}: "
                    f"{text[0] if text else ''}"
                )
            functions = _functions(runtime.compiled_functions, limit, phases, guards)
    finally:
        if registry.pm.is_registered(observer):
            registry.pm.unregister(observer)
        if runtime is not None:
            runtime.shutdown()
    return Rehearsal(stack.path, backend, limit, functions, phases.kinds(), error, time.perf_counter() - t0)


def _val_tokens(data_path: str) -> int:
    from .data import VAL_PATTERN, read_shard_header, shard_files

    return sum(read_shard_header(f) for f in shard_files(data_path, VAL_PATTERN, "validation"))


class _Files:
    """Where ``export_and_evaluate`` writes the artifact during a rehearsal: a temporary directory."""

    def __init__(self, directory: Path, log: Callable[..., None]) -> None:
        self.directory, self.log = directory, log

    def write_bytes(self, name: str, blob: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(blob)
        return path


def format_rehearsal(r: Rehearsal, stack: Stack) -> str:
    """The report: one block per compiled function, each graph with its phase and the guard that failed."""
    m = stack.model
    out = [
        f"rehearsal of {r.stack}: {m.num_layers} layers x {m.model_dim}, {stack.run.iterations} steps, seq {stack.data.train_seq_len}; "
        f"bf16 autocast, torch.compile backend {r.backend}; run.recompile_limit = {r.limit}, margin {MARGIN}; {r.seconds:.1f} s",
        "",
        f"{'function':<34} {'graphs':>6} {'limit':>5} {'margin':>6} {'breaks':>6}  where",
    ]
    for f in r.functions:
        out.append(f"{f.name:<34} {len(f.graphs):>6} {f.limit:>5} {f.margin:>6} {f.graph_breaks:>6}  {f.where}")
        for i, g in enumerate(f.graphs, 1):
            why = f"recompile, failed: {g.reason()}" if g.failed_guards else ("first compile" if i == 1 else "recompile")
            out.append(f"    {i:>2}. {g.phase:<36} {why}")
        for failure in f.failures:
            out.append(f"    failed: {failure}")
    if not r.functions:
        out.append("(nothing was compiled)")
    return "\n".join(out) + "\n"
