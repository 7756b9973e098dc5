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

from ..errors import ConfigError, PgolfError
from .common import add_stack_args, add_threads_arg, add_toy_arg, check_buildable, load_stack_and_registry, parse_nproc


TORCHRUN_PASSTHROUGH = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port", "max_restarts")
STRUCTURAL_PREFIXES = ("model.", "embedding.", "attention.", "mlp.", "residual.", "topology.", "head.", "init.", "modifier")
STRUCTURAL_KEYS = ("optimizer.use", "averaging.use", "data.train_seq_len", "data.train_batch_tokens", "run.grad_accum_base")


def _resume_names(value: str) -> tuple[Path, str, str]:
    """``--resume RUN_DIR`` → (the run's .partial directory, run_id, out_dir), touching nothing."""
    path = Path(value)
    name = path.name
    for suffix in (".partial", ".failed"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return path.parent / f"{name}.partial", name, str(path.parent)


def _reopen(value: str) -> Path:
    """Check ``--resume RUN_DIR`` and reopen a failed run as partial (one process: the launcher or rank 0)."""
    partial, name, _ = _resume_names(value)
    failed = partial.parent / f"{name}.failed"
    if (partial.parent / name).is_dir() and not partial.exists():
        raise ConfigError(f"--resume {value}: that run already finished; nothing to resume")
    if not partial.is_dir() and failed.is_dir():
        os.replace(failed, partial)
    if not partial.is_dir():
        raise ConfigError(f"--resume {value}: no run directory {partial} (or .failed) to resume")
    if not (partial / "stack.toml").is_file():
        raise ConfigError(f"--resume {value}: {partial}/stack.toml is missing; this is not a pgolf run directory")
    return partial


def _on_master(runtime, fn):
    """``fn()`` on rank 0 only (moves in the file system), its result or its error on every rank."""
    from ..runtime import broadcast_object

    result, problems = None, []
    if runtime.is_master:
        try:
            result = fn()
        except PgolfError as exc:
            problems = exc.problems
    result, problems = broadcast_object((result, problems), runtime)
    if problems:
        raise ConfigError(*problems)
    return result


# -- torchelastic ------------------------------------------------------------------------------------------
def _restart_count() -> int:
    """Which attempt of a torchelastic job this is (0 outside torchrun or on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _run_id(stack) -> str:
    """The run directory's name. Under ``torchrun --max-restarts`` every attempt must find the same run: an
    explicit id (``--run-id``, ``run.run_id``, our launcher's ``PGOLF_RUN_ID``), else one derived from the
    job's ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``; a fresh uuid per ``torchrun --standalone``)."""
    from ..rundir import new_run_id

    explicit = stack.run.run_id or os.environ.get("PGOLF_RUN_ID")
    if explicit:
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
            return f"{name or 'run'}-{slug}"
        raise ConfigError(
            "torchrun --max-restarts: a restarted worker must find its run; pass --run-id (or set run.run_id), "
            "or give torchrun --rdzv-id (or --standalone)"
        )
    return new_run_id(name)


def _elastic_reopen(out_dir: Path, run_id: str) -> str:
    """A restarted attempt's run directory: "resume" it, start it "fresh" (nothing to resume), or it is "done"."""
    final, partial, failed = out_dir / run_id, out_dir / f"{run_id}.partial", out_dir / f"{run_id}.failed"
    if final.is_dir() and not partial.exists():
        return "done"
    if not partial.is_dir() and failed.is_dir():
        os.replace(failed, partial)  # the failed attempt's directory, with its checkpoints
    return "resume" if (partial / "stack.toml").is_file() else "fresh"


def _check_resume_stack(stack, registry, run_path: Path, force: bool) -> None:
    """Refuse to continue a run with a different recipe; --force lets non-structural keys change."""
    from ..config import load_stack
    from ..config.diff import flatten
    from ..config.dump import stack_to_dict

    saved = flatten(stack_to_dict(load_stack(run_path / "stack.toml", registry)))
    now = flatten(stack_to_dict(stack))
    ignore = {"run.run_id", "run.out_dir"}
    diffs = [k for k in sorted(set(saved) | set(now)) if k not in ignore and saved.get(k) != now.get(k)]
    structural = [k for k in diffs if k.startswith(STRUCTURAL_PREFIXES) or k in STRUCTURAL_KEYS]
    blocking = structural if force else diffs
    if blocking:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in blocking[:6])
        more = f" (+{len(blocking) - 6} more)" if len(blocking) > 6 else ""
        hint = "these change the model or its state and cannot be overridden" if force else "pass the same stack, or --force for keys that do not change the model"
        raise ConfigError(f"--resume {run_path}: the stack differs from the run's ({shown}{more}); {hint}")


class StopFlag:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and stop (agreed across ranks)."""

    def __init__(self, runtime) -> None:
        import signal

        self.runtime = runtime
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __call__(self) -> bool:
        if not self.runtime.distributed:
            return self.raised
        import torch
        import torch.distributed as dist

        flag = torch.tensor(int(self.raised), device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def cmd_run(args: argparse.Namespace) -> int:
    nproc = parse_nproc(args.nproc_per_node)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stack, registry = load_stack_and_registry(args)  # validate before launching anything
    check_buildable(stack, registry)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: must be a positive number of steps")
    if args.resume:
        resume_path, run_id, out_dir = _resume_names(args.resume)
        if not under_torchrun:  # one process (or our launcher, before any worker starts) reopens and checks
            _check_resume_stack(stack, registry, _reopen(args.resume), args.force)
        stack = attrs.evolve(stack, run=attrs.evolve(stack.run, run_id=run_id, out_dir=out_dir))
    if not under_torchrun and (nproc > 1 or (args.nnodes and args.nnodes != "1")):
        return _launch_torchrun(args, nproc, stack)

    from ..rundir import RunDir
    from ..runtime import broadcast_str, setup_runtime
    from ..threads import configure as configure_threads
    from ..train import load_data, run_training

    threads = configure_threads(stack, args.threads)  # before any work: torch sizes its pool on first use
    runtime = setup_runtime(stack)
    try:
        data_files = load_data(stack, runtime.device, registry)  # bad data fails here, before anything is written
        run_id = broadcast_str(_run_id(stack), runtime)
        resume = bool(args.resume)
        if under_torchrun and _restart_count() > 0:  # torchrun --max-restarts: continue the failed attempt's run
            mode = _on_master(runtime, lambda: _elastic_reopen(Path(stack.run.out_dir), run_id))
            if mode == "done":
                if runtime.is_master:
                    print(f"run complete: {Path(stack.run.out_dir) / run_id} (finished before this restart)", file=sys.stderr)
                return 0
            resume = mode == "resume"
        elif under_torchrun and args.resume:
            _on_master(runtime, lambda: _reopen(args.resume))  # no-op after our launcher; needed under plain torchrun
            _check_resume_stack(stack, registry, Path(stack.run.out_dir) / f"{run_id}.partial", args.force)
        rundir = RunDir(stack.run.out_dir, run_id, runtime.is_master)
        rundir.open(resume=resume)
        if runtime.is_master:
            print(f"run directory: {rundir.path}", file=sys.stderr)
        from ..progress import attach
        from ..threads import attach as attach_threads

        detach_progress = attach(registry, rundir, runtime)  # a bar on a terminal, plain lines elsewhere
        detach_faults = _attach_faults(registry, runtime)
        detach_threads = attach_threads(registry, threads if runtime.is_master else None)
        try:
            stop = StopFlag(runtime) if args.checkpoint_every else None
            run_training(
                stack, registry, runtime, rundir, data_files,
                checkpoint_every=args.checkpoint_every or 0, resume=resume, stop_requested=stop,
            )
        except BaseException as exc:
            detach_progress()  # end the bar's line first, so what follows does not land on it
            reason = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
            failed = rundir.fail(reason)
            if failed is not None:
                print(f"run failed; log kept in {failed}", file=sys.stderr)
                interrupted = getattr(exc, "exit_code", None) == 130 or isinstance(exc, KeyboardInterrupt)
                _write_ledger(stack, registry, failed, run_id, "interrupted" if interrupted else "failed", reason)
            raise
        finally:
            detach_threads()
            detach_faults()
            detach_progress()
        final = rundir.finish()
    finally:
        runtime.shutdown()
    if runtime.is_master:
        _write_ledger(stack, registry, final, run_id, "complete")
    if runtime.is_master:
        _report(final)
        print(f"run complete: {final}", file=sys.stderr)
    return 0


def _attach_faults(registry, runtime):
    """``PGOLF_FAULT`` (tests of recovery): imported only when set, so a normal run loads no fault code."""
    if not os.environ.get("PGOLF_FAULT", "").strip():
        return lambda: None
    from ..faults import attach

    return attach(registry, runtime)


def _write_ledger(stack, registry, run_dir: Path, run_id: str, status: str, error: str | None = None) -> None:
    """Append the run's line to the ledger; a ledger that cannot be written never changes the run's outcome."""
    from ..ledger import append, ledger_path, make_record

    path = ledger_path(stack.run.out_dir)
    if path is None:
        return
    try:
        append(path, make_record(stack, registry, run_dir, run_id, status, error))
    except Exception as exc:
        text = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        print(f"warning: ledger not written: {text}", file=sys.stderr)


def _report(run_dir: Path) -> None:
    """report.md and loss.png for a finished run; a failure here never turns a good run into a failed one."""
    from ..report import write_report

    try:
        md, png = write_report(run_dir)
    except Exception as exc:
        print(f"warning: report not written: {type(exc).__name__}: {exc} (retry with 'pgolf report {run_dir}')", file=sys.stderr)
        return
    if png is None:
        print(f"report: {md} (loss.png skipped: matplotlib is not installed; pip install 'pgolf[plot]')", file=sys.stderr)
    else:
        print(f"report: {md}, {png}", file=sys.stderr)


def _launch_torchrun(args: argparse.Namespace, nproc: int, stack) -> int:
    """Re-run this command under torch's own launcher (``torch.distributed.run``)."""
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
    if args.resume:
        cmd += ["--resume", str(Path(stack.run.out_dir) / f"{stack.run.run_id}.partial")]
    if args.force:
        cmd.append("--force")
    if args.debug:
        cmd.append("--debug")
    env = dict(os.environ)
    env.setdefault("PGOLF_RUN_ID", stack.run.run_id or args.run_id or new_run_id(stack.meta.name or Path(stack.path).stem))
    env.setdefault("OMP_NUM_THREADS", "1")
    print("launching: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    return subprocess.call(cmd, env=env)


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
