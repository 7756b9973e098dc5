"""``pgolf run``: train, quantize, compress, round-trip and evaluate a stack, in one run directory.

It validates before launching, re-runs itself under torchrun for several processes, resumes killed or failed
runs (also after a torchelastic restart), and a ledger line or report that cannot be written never fails a run."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import attrs

from ..config.fields import run_id_problem
from ..errors import ConfigError, PgolfError, StoppedError
from ..procenv import read_process_env
from ..rundir import FAILED
from .common import add_stack_args, add_threads_arg, add_toy_arg, check_buildable, load_stack_and_registry, parse_nproc


TORCHRUN_PASSTHROUGH = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port", "max_restarts")
STRUCTURAL_PREFIXES = ("model.", "embedding.", "attention.", "mlp.", "residual.", "topology.", "head.", "init.", "modifier")
STRUCTURAL_KEYS = ("optimizer.use", "averaging.use", "data.train_seq_len", "data.train_batch_tokens", "run.grad_accum_base")
NUMBERS_KEYS = ("run.seed",)  # the checkpoint carries this seed's RNG state: a resumed run would record a seed it does not use


@attrs.define
class ResumePlan:
    """What ``--resume RUN_DIR`` will continue, checked before anything is renamed or started."""

    source: Path  # the directory as it is now: <id>.partial, <id>.failed or <id>.failed-XXXX
    run_id: str
    out_dir: Path
    step: int | None  # the checkpoint it continues from (None: step 0)
    changes: list[tuple[str, object, object]]  # keys --force let differ from the run's stack: (key, old, new)


def _locate_resume(value: str) -> tuple[Path, str]:
    """``--resume VALUE`` → (the run's directory, its run id); one line when VALUE is not a run of pgolf's."""
    path = Path(value.rstrip("/") or value)
    name = path.name
    m = FAILED.search(name)
    base = name[: m.start()] if m else name.removesuffix(".partial")
    suffixed = base != name
    if not path.exists():
        options = [p for p in (path.with_name(f"{name}.partial"), path.with_name(f"{name}.failed")) if p.is_dir()]
        if not suffixed and len(options) == 1:
            return options[0], name
        if len(options) > 1:
            raise ConfigError(f"--resume {value}: both {options[0]} and {options[1]} exist; name the one to continue")
        raise ConfigError(f"--resume {value}: no such run directory (a killed run is <out_dir>/<run_id>.partial, a failed one <run_id>.failed)")
    if not path.is_dir():
        raise ConfigError(f"--resume {value}: not a directory; pass a run directory such as runs/<run_id>.partial")
    if not (path / "stack.toml").is_file():
        raise ConfigError(f"--resume {value}: not a pgolf run directory (it has no stack.toml)")
    for streamed in ("log.txt", "metrics.jsonl"):
        if (path / streamed).exists() and not (path / streamed).is_file():
            raise ConfigError(f"--resume {value}: {path / streamed} is not a file; the run directory is damaged")
    if not suffixed:
        partial = path.with_name(f"{name}.partial")
        if partial.is_dir():
            raise ConfigError(f"--resume {value}: that run already finished; {partial} exists too: resume that one if it is another attempt")
        raise ConfigError(f"--resume {value}: that run already finished; nothing to resume")
    problem = run_id_problem(base) or (None if base else "is empty")
    if problem:
        raise ConfigError(f"--resume {value}: the run id {problem}; this is not a run directory pgolf wrote")
    if path.with_name(base).exists():
        raise ConfigError(f"--resume {value}: {path.with_name(base)} exists: this run already finished once; rename one of them to continue the other")
    return path, base


def plan_resume(value: str, stack, registry, force: bool, world_size: int, verify_files: bool = True) -> ResumePlan:
    """Every check of ``--resume``, touching nothing: the directory is a pgolf run, its stack matches (with
    --force: no key that changes the model or the numbers' meaning), its newest checkpoint is intact and was
    written by as many processes, and the iterations still reach past it."""
    from .. import checkpoint
    from ..config import load_stack
    from ..config.diff import flatten
    from ..config.dump import stack_to_dict

    source, run_id = _locate_resume(value)
    try:
        saved_stack = load_stack(source / "stack.toml", registry)
    except PgolfError as exc:
        raise ConfigError(f"--resume {value}: the run's stack.toml does not load: {exc.problems[0]}") from None
    saved, now = flatten(stack_to_dict(saved_stack)), flatten(stack_to_dict(stack))
    diffs = [k for k in sorted(set(saved) | set(now)) if k not in ("run.run_id", "run.out_dir") and saved.get(k) != now.get(k)]
    structural = [k for k in diffs if k.startswith(STRUCTURAL_PREFIXES) or k in STRUCTURAL_KEYS or k in NUMBERS_KEYS]
    blocking = structural if force else diffs
    if blocking:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in blocking[:6])
        more = f" (+{len(blocking) - 6} more)" if len(blocking) > 6 else ""
        hint = (
            "these change the model, its state or what the run's numbers mean, and cannot be overridden" if force
            else "pass the same stack, or --force for keys that do not change the model"
        )
        raise ConfigError(f"--resume {value}: the stack differs from the run's ({shown}{more}); {hint}")
    latest = checkpoint.latest(source)
    step = None
    if latest is not None:
        marker = checkpoint.verify(latest, world_size) if verify_files else checkpoint.read_marker(latest)
        step = marker["step"]
        if stack.run.iterations < step:
            raise ConfigError(
                f"--resume {value}: run.iterations={stack.run.iterations} is below the checkpoint's step {step}; the run "
                f"would never reach its last step: set run.iterations >= {step}"
            )
    return ResumePlan(source, run_id, source.parent, step, [(k, saved.get(k), now.get(k)) for k in diffs])


def _on_master(runtime, fn):
    """``fn()`` on rank 0 only (moves in the file system), its result or its error on every rank."""
    from ..runtime import broadcast_object

    result, problems, error = None, [], None
    if runtime.is_master:
        try:
            result = fn()
        except PgolfError as exc:
            problems, error = exc.problems, exc
    result, problems = broadcast_object((result, problems), runtime)
    if error is not None:
        raise error
    if problems:
        raise ConfigError(*problems)
    return result


# -- torchelastic ------------------------------------------------------------------------------------------
def _restart_count() -> int:
    """Which attempt of a torchelastic job this is (0 outside torchrun or on the first attempt)."""
    from ..procenv import attempt_or_zero

    return attempt_or_zero()


def _run_id(stack) -> str:
    """The run directory's name. Under ``torchrun --max-restarts`` every attempt must find the same run: an
    explicit id (``--run-id``, ``run.run_id``, our launcher's ``PGOLF_RUN_ID``), else one derived from the
    job's ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``; a fresh uuid per ``torchrun --standalone``)."""
    from ..rundir import new_run_id

    explicit = stack.run.run_id or os.environ.get("PGOLF_RUN_ID")
    if explicit:
        problem = run_id_problem(explicit)
        if problem:
            raise ConfigError(f"run id (PGOLF_RUN_ID) {problem}")
        return explicit
    name = stack.meta.name or Path(stack.path).stem
    try:
        elastic = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
    except ValueError:
        elastic = False
    if elastic:
        job = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if job and job != "none":
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)[:40]
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._-")[:60]
            return f"{stem or 'run'}-{slug}"
        raise ConfigError(
            "torchrun --max-restarts: a restarted worker must find its run; pass --run-id (or set run.run_id), "
            "or give torchrun --rdzv-id (or --standalone)"
        )
    return new_run_id(name)


def _elastic_reopen(out_dir: Path, run_id: str) -> tuple[str, Path | None]:
    """A restarted attempt's run directory (under the run's lock): ("resume", dir), ("fresh", None), or ("done", None)."""
    final, partial = out_dir / run_id, out_dir / f"{run_id}.partial"
    if final.is_dir() and not partial.exists():
        return "done", None
    if partial.is_dir():
        return ("resume", partial) if (partial / "stack.toml").is_file() else ("fresh", None)
    failed = sorted((p for p in out_dir.glob(f"{run_id}.failed*") if FAILED.fullmatch(p.name[len(run_id):]) and p.is_dir()),
                    key=lambda p: p.stat().st_mtime)
    if failed and (failed[-1] / "stack.toml").is_file():
        return "resume", failed[-1]  # the failed attempt's directory, with its checkpoints
    return "fresh", None


def check_fits(stack, runtime, params: int) -> None:
    """Refuse, before anything is allocated, a model whose lower-bound memory exceeds this process's device."""
    from ..config.checks import check_memory

    total, where = _device_memory(runtime)
    if total:
        check_memory(stack, total, where, params=params)


def _device_memory(runtime) -> tuple[int, str]:
    if runtime.is_cuda:
        import torch

        props = torch.cuda.get_device_properties(runtime.device)
        return int(props.total_memory), f"{props.name} ({runtime.device}) has"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, ""
    try:
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        local = 1
    return total // local, f"this host's memory{f' shared by {local} processes' if local > 1 else ''} gives each process"


def cmd_run(args: argparse.Namespace) -> int:
    from ..signals import SignalGuard

    guard = SignalGuard(graceful=bool(args.checkpoint_every)).install()  # SIGTERM/SIGINT: see pgolf_core/signals.py
    try:
        return _checked_run(args, guard)
    finally:
        guard.restore()


def _checked_run(args: argparse.Namespace, guard) -> int:
    from ..procenv import elastic_attempt

    layout = read_process_env()  # a garbled RANK/WORLD_SIZE is one line, before anything else
    elastic_attempt()
    if os.environ.get("PGOLF_FAULT", "").strip():  # a bad fault spec is an input error like any other
        from ..faults import parse

        parse(os.environ["PGOLF_FAULT"])
    nproc = parse_nproc(args.nproc_per_node)
    under_torchrun = layout.distributed
    stack, registry = load_stack_and_registry(args)  # validate before launching anything
    model, _ = check_buildable(stack, registry)
    from ..model.gpt import count_parameters

    params = count_parameters(model)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: must be a positive number of steps")
    if args.force and not args.resume:
        raise ConfigError("--force only applies to --resume RUN_DIR")
    launching = not under_torchrun and (nproc > 1 or bool(args.nnodes and args.nnodes != "1"))
    plan = None
    if args.resume:
        world = nproc if launching else layout.world_size
        plan = plan_resume(args.resume, stack, registry, args.force, world, verify_files=layout.rank == 0)
        stack = attrs.evolve(stack, run=attrs.evolve(stack.run, run_id=plan.run_id, out_dir=str(plan.out_dir)))
    if launching:
        return _launch_torchrun(args, nproc, stack, plan)
    return _run(args, stack, registry, params, plan, guard)


def _run(args, stack, registry, params: int, plan: ResumePlan | None, guard) -> int:
    from ..rundir import RunDir, RunLock
    from ..runtime import broadcast_str, setup_runtime
    from ..threads import configure as configure_threads
    from ..train import load_data

    threads = configure_threads(stack, args.threads)  # before any work: torch sizes its pool on first use
    runtime = setup_runtime(stack)
    guard.runtime = runtime
    lock = None
    try:
        check_fits(stack, runtime, params)
        data_files = load_data(stack, runtime.device, registry)  # bad data fails here, before anything is written
        run_id = broadcast_str(_run_id(stack), runtime)
        out_dir = Path(stack.run.out_dir)
        lock = RunLock(out_dir, run_id) if runtime.is_master else None
        _on_master(runtime, lambda: lock.acquire())  # one run per run id, from here until the run is committed
        source = plan.source if plan is not None else None
        if runtime.distributed and _restart_count() > 0:  # torchrun --max-restarts: continue the failed attempt's run
            mode, found = _on_master(runtime, lambda: _elastic_reopen(out_dir, run_id))
            if mode == "done":
                if runtime.is_master:
                    print(f"run complete: {out_dir / run_id} (finished before this restart)", file=sys.stderr)
                return 0
            source = found if mode == "resume" else source
        rundir = RunDir(stack.run.out_dir, run_id, runtime.is_master)
        extra: dict = {} if plan is None else {"resumed_from_step": plan.step}
        cleanup = _Cleanup(stack, registry, rundir, run_id, extra, guard)
        try:
            try:
                with guard.shield(deliver=True):  # opened and armed together: a signal cannot fall in between
                    _on_master(runtime, lambda: _open_rundir(rundir, source))
                    cleanup.armed = guard.opened = True  # from here on, a failure marks this run's directory failed
                return _train_and_commit(args, stack, registry, runtime, rundir, data_files, source is not None, plan, guard, extra, threads)
            except BaseException as exc:
                cleanup.failed(exc)
                raise
        except StoppedError as late:  # a signal in the first instructions of the cleanup above: finish it
            cleanup.failed(late)
            raise
    finally:
        with guard.shield():
            if lock is not None:
                lock.release()
            runtime.shutdown()


def _open_rundir(rundir, source: Path | None) -> None:
    """Under the lock: a resumed run's directory becomes ``.partial`` (only now, after every check), then opens."""
    if source is not None:
        rundir.adopt(source)
    try:
        rundir.open(resume=source is not None)
    except PgolfError:
        if source is not None and source != rundir.path and rundir.path.is_dir() and not source.exists():
            os.replace(rundir.path, source)  # a refused resume renames nothing: put the directory back
        raise


def _train_and_commit(args, stack, registry, runtime, rundir, data_files, resume: bool, plan, guard, extra: dict, threads) -> int:
    """Train, export and evaluate in the open run directory, then commit it: the ledger line, then the rename."""
    from ..progress import attach
    from ..threads import attach as attach_threads
    from ..train import run_training

    if runtime.is_master:
        print(f"run directory: {rundir.path}", file=sys.stderr)
    if plan is not None and plan.changes:  # --force: what the resumed run really uses is what it records
        from ..config.dump import stack_to_toml

        rundir.write_text("stack.toml", stack_to_toml(stack))
        changed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in plan.changes)
        rundir.log(f"resume: --force changed {changed}")
        extra["forced"] = {k: [old, new] for k, old, new in plan.changes}
    detach_progress = attach(registry, rundir, runtime)  # a bar on a terminal, plain lines elsewhere
    detach_faults = _attach_faults(registry, runtime)
    detach_guard = guard.attach(registry)
    detach_threads = attach_threads(registry, threads if runtime.is_master else None)
    try:
        run_training(
            stack, registry, runtime, rundir, data_files,
            checkpoint_every=args.checkpoint_every or 0, resume=resume,
            stop_requested=guard if args.checkpoint_every else None,
        )
    finally:
        detach_threads()
        detach_guard()
        detach_faults()
        detach_progress()
    guard.phase = "commit"
    with guard.shield():  # the ledger line first, then the rename: a finished run always has its line
        rundir.close()
        final = rundir.final
        if runtime.is_master:
            _write_ledger(stack, registry, rundir.path, rundir.run_id, "complete", recorded_dir=final, extra=extra)
        rundir.finish()
    if runtime.is_master:
        guard.phase = "report"
        if not guard.received:
            _report(final)
        print(f"run complete: {final}", file=sys.stderr)
    if guard.received:
        if runtime.is_master:
            print(f"error: {guard.received[0]} arrived after the run was committed; it is complete, its report was skipped "
                  f"(pgolf report {final})", file=sys.stderr)
        return 130
    return 0


class _Cleanup:
    """A failed run's cleanup, once: the directory becomes .failed and the ledger gets its line, shielded from
    further signals."""

    def __init__(self, stack, registry, rundir, run_id: str, extra: dict, guard) -> None:
        self.stack, self.registry, self.rundir, self.run_id, self.extra, self.guard = stack, registry, rundir, run_id, extra, guard
        self.armed = False  # only once this run opened its directory: never touch another run's
        self.done = False

    def failed(self, exc: BaseException) -> None:
        with self.guard.shield():
            if self.done or not self.armed:
                return
            self.done = True
            reason = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
            failed = self.rundir.fail(reason)
            if failed is None:
                return
            _stderr(f"run failed; log kept in {failed}")
            interrupted = getattr(exc, "exit_code", None) == 130 or isinstance(exc, KeyboardInterrupt)
            _write_ledger(self.stack, self.registry, failed, self.run_id, "interrupted" if interrupted else "failed", reason, extra=self.extra)


def _stderr(line: str) -> None:
    try:
        print(line, file=sys.stderr)
    except (OSError, ValueError):
        pass


def _attach_faults(registry, runtime):
    """``PGOLF_FAULT`` (tests of recovery): imported only when set, so a normal run loads no fault code."""
    if not os.environ.get("PGOLF_FAULT", "").strip():
        return lambda: None
    from ..faults import attach

    return attach(registry, runtime)


def _write_ledger(stack, registry, run_dir: Path, run_id: str, status: str, error: str | None = None,
                  recorded_dir: Path | None = None, extra: dict | None = None) -> None:
    """Append the run's line to the ledger; a ledger that cannot be written never changes the run's outcome."""
    from ..ledger import append, ledger_path, make_record

    path = ledger_path(stack.run.out_dir)
    if path is None:
        return
    try:
        append(path, make_record(stack, registry, run_dir, run_id, status, error, recorded_dir=recorded_dir, extra=extra))
    except Exception as exc:
        text = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        _stderr(f"warning: ledger not written: {text}")


def _report(run_dir: Path) -> None:
    """report.md and loss.png for a finished run; a failure here never turns a good run into a failed one."""
    from ..report import write_report

    try:
        md, png = write_report(run_dir)
    except Exception as exc:
        text = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        _stderr(f"warning: report not written: {text} (retry with 'pgolf report {run_dir}')")
        return
    if png is None:
        print(f"report: {md} (loss.png skipped: matplotlib is not installed; pip install 'pgolf[plot]')", file=sys.stderr)
    else:
        print(f"report: {md}, {png}", file=sys.stderr)


def _launch_torchrun(args: argparse.Namespace, nproc: int, stack, plan: ResumePlan | None = None) -> int:
    """Re-run this command under torch's own launcher (``torch.distributed.run``) and wait for it. SIGTERM is
    passed on to torchrun (which stops its workers, each finishing as a signalled run does); SIGINT from a
    terminal reaches every process of the group by itself, so the launcher only waits for their exit code."""
    import signal

    from ..rundir import new_run_id

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    multi_node = any(getattr(args, k) for k in TORCHRUN_PASSTHROUGH if k != "max_restarts")
    if not multi_node:
        cmd.append("--standalone")
    for key in TORCHRUN_PASSTHROUGH:
        value = getattr(args, key)
        if value:
            cmd.append(f"--{key}={value}")
    cmd += ["-m", "pgolf_core", "run", args.stack]
    for expr in args.set or []:
        cmd += ["--set", expr]
    for module in args.plugin or []:
        cmd += ["--plugin", module]
    if args.legacy_env:
        cmd.append("--legacy-env")
    if getattr(args, "toy", False):
        cmd.append("--toy")
    if getattr(args, "threads", None):
        cmd += ["--threads", str(args.threads)]
    if args.out_dir:
        cmd += ["--out-dir", args.out_dir]
    if args.run_id:
        cmd += ["--run-id", args.run_id]
    if args.checkpoint_every:
        cmd += ["--checkpoint-every", str(args.checkpoint_every)]
    if plan is not None:
        cmd += ["--resume", str(plan.source)]
    if args.force:
        cmd.append("--force")
    if args.debug:
        cmd.append("--debug")
    env = dict(os.environ)
    env.setdefault("PGOLF_RUN_ID", stack.run.run_id or args.run_id or new_run_id(stack.meta.name or Path(stack.path).stem))
    env.setdefault("OMP_NUM_THREADS", "1")
    print("launching: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame) -> None:
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signum)

    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="train, quantize, compress, round-trip and evaluate a stack")
    add_stack_args(run)
    add_toy_arg(run)
    add_threads_arg(run)
    run.add_argument("--nproc-per-node", default="auto", help="processes on this node; 'auto' = number of GPUs (1 on CPU)")
    run.add_argument("--run-id", help="run directory name (default: timestamp-name-hex)")
    run.add_argument("--out-dir", help="parent of the run directory (default: run.out_dir)")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="checkpoint every N steps (and on SIGTERM/SIGINT)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or failed run from its last complete checkpoint")
    run.add_argument("--force", action="store_true", help="with --resume: allow stack changes that do not change the model")
    for key in TORCHRUN_PASSTHROUGH:
        run.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"passed to torchrun as --{key}")
    run.set_defaults(func=cmd_run)
