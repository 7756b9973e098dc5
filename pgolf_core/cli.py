"""The ``pgolf`` command: run, validate, config, bench, bench-gptq, list, show, stacks, schema, report, compare, significance, ledger, data.

Every user error is printed as one line per problem on stderr (``error: …``) with exit code 2 (3 for an
artifact over the cap) and no traceback; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError, PgolfError

REPO_STACKS = Path(__file__).resolve().parent.parent / "stacks"
TORCHRUN_PASSTHROUGH = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port", "max_restarts")


def _registry(args: argparse.Namespace):
    from .registry import default_registry

    return default_registry(tuple(getattr(args, "plugin", None) or ()))


def resolve_stack_path(value: str) -> str:
    """A stack argument is a path, or the name of a bundled stack (``baseline`` → stacks/baseline.toml)."""
    if Path(value).is_file() or value.endswith(".toml"):
        return value
    candidate = REPO_STACKS / f"{value}.toml"
    if candidate.is_file():
        return str(candidate)
    return value


def _load(args: argparse.Namespace):
    from .config import load_stack

    registry = _registry(args)
    env = dict(os.environ) if getattr(args, "legacy_env", False) else None
    stack = load_stack(resolve_stack_path(args.stack), registry, overrides=args.set or [], legacy_env=env)
    if getattr(args, "run_id", None) or getattr(args, "out_dir", None):
        changes = {}
        if args.run_id:
            changes["run_id"] = args.run_id
        if args.out_dir:
            changes["out_dir"] = args.out_dir
        stack = attrs.evolve(stack, run=attrs.evolve(stack.run, **changes))
    return stack, registry


# ---------------------------------------------------------------------------------------------------------
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
    from .runtime import broadcast_object

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
    from .rundir import new_run_id

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
    from .config import load_stack
    from .config.diff import flatten
    from .config.dump import stack_to_dict

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
    nproc = _nproc(args.nproc_per_node)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stack, registry = _load(args)  # validate before launching anything
    _check_buildable(stack, registry)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: must be a positive number of steps")
    if args.resume:
        resume_path, run_id, out_dir = _resume_names(args.resume)
        if not under_torchrun:  # one process (or our launcher, before any worker starts) reopens and checks
            _check_resume_stack(stack, registry, _reopen(args.resume), args.force)
        stack = attrs.evolve(stack, run=attrs.evolve(stack.run, run_id=run_id, out_dir=out_dir))
    if not under_torchrun and (nproc > 1 or (args.nnodes and args.nnodes != "1")):
        return _launch_torchrun(args, nproc, stack)

    from .rundir import RunDir
    from .runtime import broadcast_str, setup_runtime
    from .train import load_data, run_training

    runtime = setup_runtime(stack)
    try:
        data_files = load_data(stack, runtime.device)  # bad data fails here, before anything is written
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
        from .progress import attach

        detach_progress = attach(registry, rundir, runtime)  # a bar on a terminal, plain lines elsewhere
        detach_faults = _attach_faults(registry, runtime)
        try:
            stop = StopFlag(runtime) if args.checkpoint_every else None
            run_training(
                stack, registry, runtime, rundir, data_files,
                checkpoint_every=args.checkpoint_every or 0, resume=resume, stop_requested=stop,
            )
        except BaseException as exc:
            reason = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
            failed = rundir.fail(reason)
            if failed is not None:
                print(f"run failed; log kept in {failed}", file=sys.stderr)
                interrupted = getattr(exc, "exit_code", None) == 130 or isinstance(exc, KeyboardInterrupt)
                _write_ledger(stack, registry, failed, run_id, "interrupted" if interrupted else "failed", reason)
            raise
        finally:
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
    from .faults import attach

    return attach(registry, runtime)


def _write_ledger(stack, registry, run_dir: Path, run_id: str, status: str, error: str | None = None) -> None:
    """Append the run's line to the ledger; a ledger that cannot be written never changes the run's outcome."""
    from .ledger import append, ledger_path, make_record

    path = ledger_path(stack.run.out_dir)
    if path is None:
        return
    try:
        append(path, make_record(stack, registry, run_dir, run_id, status, error))
    except Exception as exc:
        text = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        print(f"warning: ledger not written: {text}", file=sys.stderr)


def _check_buildable(stack, registry):
    """Build what a run builds from the stack alone (the model on the meta device, the schedule, averaging,
    quantizer, compressor and evaluator objects), so settings a technique rejects fail as one line before
    anything starts. Returns the model and the built slot objects."""
    import torch

    from .model.gpt import build_model
    from .train import build_slot, technique_table

    try:
        with torch.device("meta"):
            model, _ = build_model(stack, registry)
    except PgolfError:
        raise
    except Exception as exc:
        raise ConfigError(f"{stack.path}: the model does not build: {_first_line(exc)} (techniques: {technique_table(stack)})") from None
    built = {}
    for slot in ("schedule", "averaging", "quantizer", "compressor", "evaluator"):
        try:
            built[slot] = build_slot(stack, registry, slot)
        except PgolfError:
            raise
        except Exception as exc:
            raise ConfigError(f"{stack.path}: {slot}({stack.technique(slot)}): {_first_line(exc)}") from None
    return model, built


def compliance_lines(stack, built: dict) -> list[str]:
    """What validate says about the challenge's rules: each final line the evaluator will report, and the
    quantizer's calibration source. Evaluators without ``reported_lines`` get one line from their flag."""
    from .train import final_line_compliance, quantizer_compliance

    evaluator, quantizer, compressor = built.get("evaluator"), built.get("quantizer"), built.get("compressor")
    out = []
    names = None
    if callable(getattr(evaluator, "reported_lines", None)):
        names = evaluator.reported_lines(getattr(quantizer, "label", "q"), getattr(compressor, "label", "c"))
    if names:
        for name, check in final_line_compliance(evaluator, names).items():
            out.append(f"  {name} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    elif evaluator is not None:
        ok = bool(getattr(evaluator, "compliant", True))
        out.append(f"  evaluator({stack.technique('evaluator')}) {'ok' if ok else 'NOT_COMPLIANT'} - {getattr(evaluator, 'compliance_note', '') or '(no note)'}")
    for check in quantizer_compliance(quantizer):
        out.append(f"  {check.what} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    return out


def _first_line(exc: BaseException) -> str:
    """A technique's own words for a ValueError (it says what is wrong); the type too for anything else."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(exc, ValueError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def _report(run_dir: Path) -> None:
    """report.md and loss.png for a finished run; a failure here never turns a good run into a failed one."""
    from .report import write_report

    try:
        md, png = write_report(run_dir)
    except Exception as exc:
        print(f"warning: report not written: {type(exc).__name__}: {exc} (retry with 'pgolf report {run_dir}')", file=sys.stderr)
        return
    if png is None:
        print(f"report: {md} (loss.png skipped: matplotlib is not installed; pip install 'pgolf[plot]')", file=sys.stderr)
    else:
        print(f"report: {md}, {png}", file=sys.stderr)


def _nproc(value: str) -> int:
    if value == "auto":
        try:
            import torch

            return max(torch.cuda.device_count(), 1)
        except Exception:
            return 1
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--nproc-per-node {value!r}: expected an integer or 'auto'") from None
    if n < 1:
        raise ConfigError(f"--nproc-per-node {n}: must be >= 1")
    return n


def _launch_torchrun(args: argparse.Namespace, nproc: int, stack) -> int:
    """Re-run this command under torch's own launcher (``torch.distributed.run``)."""
    from .rundir import new_run_id

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


def cmd_validate(args: argparse.Namespace) -> int:
    from .model.gpt import count_parameters

    stack, registry = _load(args)
    model, built = _check_buildable(stack, registry)
    n = count_parameters(model)
    print(f"{stack.path}: ok")
    print(f"model_params:{n}")
    for slot, choice in stack.slots.items():
        print(f"  {slot:<10} {choice.technique}")
    for i, mod in enumerate(stack.modifiers):
        print(f"  modifier[{i}] {mod.technique} layers={mod.layers!r}")
    lines = compliance_lines(stack, built)
    if lines:
        print("compliance (the challenge's rules: no validation token used before it is scored, no training data after the training clock):")
        print("\n".join(lines))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config.dump import stack_to_dict, stack_to_toml

    if args.as_env and (args.diff or args.format != "toml"):
        raise ConfigError("--as-env prints NAME=value lines; it does not combine with --diff or --format")
    stack, registry = _load(args)
    if args.diff:
        from .config import load_stack
        from .config.diff import diff_stacks, format_diff

        other = load_stack(resolve_stack_path(args.diff), registry)
        if args.format == "json":
            rows = [{"key": k, "old": a, "new": b} for k, a, b in diff_stacks(other, stack)]
            print(json.dumps({"stack": stack.path, "other": other.path, "differences": rows}, indent=2))
        else:
            print(format_diff(other, stack), end="")
        return 0
    if args.as_env:
        return _print_as_env(stack, registry)
    if args.format == "json":
        print(json.dumps(stack_to_dict(stack), indent=2))
    else:
        print(stack_to_toml(stack), end="")
    return 0


def _print_as_env(stack, registry) -> int:
    """The reference script's environment for the stack, one NAME=value a line; what it cannot say on stderr."""
    from .envexport import stack_to_env

    exported = stack_to_env(stack, registry)
    for line in exported.lines():
        print(line)
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench as bench

    stack, registry = _load(args)
    return bench(args, stack, registry, _nproc(args.nproc_per_node))


def cmd_bench_gptq(args: argparse.Namespace) -> int:
    from .bench_gptq import dump, format_gptq_bench, run_gptq_bench

    stack, registry = _load(args)
    modes = [m.strip() for m in args.kv_cache.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("exact", "approximate", "off")]
    if bad or not modes:
        raise ConfigError(f"--kv-cache {args.kv_cache}: expected a comma list of exact, approximate, off")
    result = run_gptq_bench(stack, registry, device=args.device, seqs=args.seqs, seq_len=args.seq_len, modes=modes, quantize=not args.no_quantize)
    print(format_gptq_bench(result))
    if args.json:
        dump(result, args.json)
    return 0


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def cmd_list(args: argparse.Namespace) -> int:
    from .hookspecs import SLOTS

    registry = _registry(args)
    regs = [r for r in registry.all() if not args.slot or r.technique.slot == args.slot]
    if args.json:
        out = {
            "techniques": [
                {
                    "name": r.technique.name,
                    "slot": r.technique.slot,
                    "distribution": r.distribution,
                    "version": r.version,
                    "module": r.module,
                    "summary": r.technique.summary,
                    "source": r.technique.source,
                    "requires": list(r.technique.requires),
                    "conflicts": list(r.technique.conflicts),
                    "compile_safe": r.technique.compile_safe,
                    "example": r.technique.example,
                    "parameters": [a.name for a in attrs.fields(r.technique.params)],
                }
                for r in regs
            ],
            "failed": [attrs.asdict(f) for f in registry.failures],
        }
        print(json.dumps(out, indent=2))
        return 0
    if args.slot and args.slot not in SLOTS:
        raise ConfigError(f"--slot {args.slot}: unknown slot; slots: {', '.join(SLOTS)}")
    for slot in SLOTS:
        rows = [r for r in regs if r.technique.slot == slot]
        if not rows:
            continue
        print(f"{slot}:")
        for r in rows:
            params = ", ".join(a.name for a in attrs.fields(r.technique.params)) or "-"
            print(f"  {r.technique.name:<16} {r.distribution} {r.version}  {r.technique.summary}")
            print(f"  {'':<16} params: {params}")
            if r.technique.source:
                print(f"  {'':<16} source: {r.technique.source}")
    for f in registry.failures:
        print(f"failed plugin {f.distribution} ({f.entry_point}): {f.error}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    regs = registry.find(args.name)
    if not regs:
        from .config.convert import did_you_mean

        names = sorted({r.technique.name for r in registry.all()})
        raise ConfigError(f"no technique named '{args.name}'{did_you_mean(args.name, names)}; see 'pgolf list'")
    for r in regs:
        t = r.technique
        print(f"{t.name}  (slot {t.slot}; {r.distribution} {r.version}; module {r.module})")
        print(f"  {t.summary}")
        if t.source:
            print(f"  source: {t.source}")
        if t.requires:
            print(f"  requires: {', '.join(t.requires)}")
        if t.conflicts:
            print(f"  conflicts: {', '.join(t.conflicts)}")
        if not t.compile_safe:
            print("  compile_safe: no (the model runs eager when this technique is used)")
        fields = attrs.fields(t.params)
        print("  parameters:" if fields else "  parameters: none")
        for a in fields:
            default = "required" if a.default is attrs.NOTHING else repr(a.default)
            extra = []
            if a.metadata.get("unit"):
                extra.append(f"unit {a.metadata['unit']}")
            if a.metadata.get("env"):
                env = a.metadata["env"]
                extra.append(f"legacy env {env if isinstance(env, str) else ' / '.join(env)}")
            tail = f" [{'; '.join(extra)}]" if extra else ""
            print(f"    {a.name}: {_type_name(a.type)} = {default}  {a.metadata.get('help', '')}{tail}")
        if t.example:
            print("  example:")
            for line in t.example.splitlines():
                print(f"    {line}")
    return 0


def cmd_stacks(args: argparse.Namespace) -> int:
    import sys as _sys

    if _sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    for path in sorted(REPO_STACKS.glob("*.toml")):
        meta = tomllib.loads(path.read_text(encoding="utf-8")).get("meta", {})
        bpb = meta.get("reported_val_bpb")
        print(f"{path.stem:<12} {meta.get('name', '')}  reported val_bpb {bpb if bpb is not None else '-'}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .config.json_schema import stack_schema

    print(json.dumps(stack_schema(_registry(args)), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import NO_MATPLOTLIB, write_report

    md, png = write_report(args.run_dir)
    print(f"{md}")
    print(f"{png}" if png else f"loss.png skipped: {NO_MATPLOTLIB}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .report import NO_MATPLOTLIB, compare_table, plot_compare, read_run

    runs = [read_run(p) for p in args.runs]
    print(compare_table(runs), end="")
    if args.no_plot:
        return 0
    try:
        plot_compare(runs, Path(args.plot))
    except ImportError:
        print(f"plot skipped: {NO_MATPLOTLIB}", file=sys.stderr)
        return 0
    print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def cmd_significance(args: argparse.Namespace) -> int:
    from .report import read_run
    from .stats import welch_improvement

    def values(paths: list[str], side: str) -> list[float]:
        out = []
        for path in paths:
            run = read_run(path)
            value = run.final_loss if args.metric == "val_loss" else run.final_bpb
            if value is None:
                raise ConfigError(f"{path}: no final {args.metric} (submission.json or a final metrics record); is the run finished?")
            seed = run.summary.get("seed", "?")
            print(f"{side:<9} {run.run_id}  seed {seed}  {args.metric} {value:.8f}")
            out.append(value)
        return out

    candidate = values(args.runs, "candidate")
    baseline = values(args.baseline, "baseline")
    try:
        r = welch_improvement(candidate, baseline, delta=args.delta, alpha=args.alpha)
    except ValueError as exc:
        raise ConfigError(f"significance: {exc}; add runs with other seeds") from None
    unit = "nats" if args.metric == "val_loss" else "bits/byte"
    print(f"candidate: n={r.n_candidate} mean={r.mean_candidate:.6f} std={r.std_candidate:.6f}")
    print(f"baseline:  n={r.n_baseline} mean={r.mean_baseline:.6f} std={r.std_baseline:.6f}")
    print(f"improvement: {r.improvement:.6f} {unit} (required > {r.delta} {unit})")
    print(f"welch one-sided: t={r.t:.4f} df={r.df:.2f} p={r.p:.6g} (alpha {r.alpha})")
    if r.significant:
        print(f"SIGNIFICANT: the candidate beats the baseline by more than {r.delta} {unit} at p < {r.alpha}")
        return 0
    print(f"NOT SIGNIFICANT: an improvement of more than {r.delta} {unit} is not shown at p < {r.alpha}")
    return 1


def cmd_ledger(args: argparse.Namespace) -> int:
    from .ledger import FILENAME, format_table, read

    path = Path(args.file) if args.file else Path(args.out_dir) / FILENAME
    records, bad = read(path)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{path}: {len(records)} runs")
        print(format_table(records), end="")
    if bad:
        print(f"warning: {path}: {bad} unreadable line(s) skipped", file=sys.stderr)
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from .download import HubSource, download

    source = HubSource(args.repo_id, args.remote_root, args.revision, args.endpoint, args.cache_dir)
    result = download(args.variant, args.train_shards, args.dir, source, log=lambda line: print(line, file=sys.stderr))
    n = len(result.fetched) + len(result.kept)
    print(f"data ready: {n} files ({len(result.fetched)} downloaded, {len(result.kept)} already present and verified)")
    tokenizer = f', data.tokenizer = "{result.tokenizer_path}"' if result.tokenizer_path else ""
    print(f'use it in a stack: data.path = "{result.dataset_dir}"{tokenizer}')
    return 0


# ---------------------------------------------------------------------------------------------------------
def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", help="stack file (or the name of a bundled stack, e.g. baseline)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, value parsed as TOML (repeatable)")
    p.add_argument("--legacy-env", action="store_true", help="apply reference-script environment variables (NUM_LAYERS, ...)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter-golf recipes as plugins and stack files.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--plugin", action="append", metavar="MODULE", help="load a local plugin module (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="train, quantize, compress, round-trip and evaluate a stack")
    _add_stack_args(run)
    run.add_argument("--nproc-per-node", default="auto", help="processes on this node; 'auto' = number of GPUs (1 on CPU)")
    run.add_argument("--run-id", help="run directory name (default: timestamp-name-hex)")
    run.add_argument("--out-dir", help="parent of the run directory (default: run.out_dir)")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="checkpoint every N steps (and on SIGTERM/SIGINT)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or failed run from its last complete checkpoint")
    run.add_argument("--force", action="store_true", help="with --resume: allow stack changes that do not change the model")
    for key in TORCHRUN_PASSTHROUGH:
        run.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"passed to torchrun as --{key}")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", parents=[common], help="resolve and check a stack, build it on the meta device")
    _add_stack_args(validate)
    validate.set_defaults(func=cmd_validate)

    config = sub.add_parser("config", parents=[common], help="print the resolved stack")
    _add_stack_args(config)
    config.add_argument("--format", choices=("toml", "json"), default="toml")
    config.add_argument("--diff", metavar="OTHER", help="print only the resolved keys whose values differ from stack OTHER (old -> new)")
    config.add_argument("--as-env", action="store_true", help="print the reference script's environment variables for the stack (inverse of --legacy-env)")
    config.set_defaults(func=cmd_config)

    bench = sub.add_parser("bench", parents=[common], help="time training steps: step time, tokens/s, memory, MFU; optionally vs a reference script")
    _add_stack_args(bench)
    bench.add_argument("--steps", type=int, default=100, help="timed steps after the warm-up (default 100)")
    bench.add_argument("--warmup-steps", type=int, help="compile warm-up steps, not timed (default: the stack's run.warmup_steps)")
    bench.add_argument("--peak-tflops", type=float, help="device peak for MFU in TFLOP/s (default 989, H100 SXM dense bf16, on CUDA; none on CPU)")
    bench.add_argument("--json", metavar="PATH", help="also write every number as JSON to PATH ('-' for stdout)")
    bench.add_argument("--reference", metavar="TRAIN_GPT_PY", help="run this reference script with the stack's environment on the same shards and steps, and compare")
    bench.add_argument("--reference-env", action="append", metavar="NAME=VALUE", help="extra environment for the reference script, over the stack's (repeatable)")
    bench.add_argument("--eval", action="store_true", help="also time the stack's evaluator after the steps (and let the reference run its final evaluation)")
    bench.add_argument("--val-tokens", type=int, metavar="N", help="evaluate a fixed slice: the first N validation tokens (both pgolf and the reference)")
    bench.add_argument("--nproc-per-node", default="1", help="processes (GPUs) for both pgolf and the reference; default 1")
    bench.add_argument("--verbose", action="store_true", help="echo pgolf's and the reference's log lines to stderr")
    bench.set_defaults(func=cmd_bench)

    bg = sub.add_parser("bench-gptq", parents=[common], help="time GPTQ's self-generated calibration, Hessians and quantization for a stack's model")
    _add_stack_args(bg)
    bg.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="where generation and Hessians run (default: cuda when present)")
    bg.add_argument("--seqs", type=int, help="calibration sequences (default: the stack's calib_seqs)")
    bg.add_argument("--seq-len", type=int, help="tokens per sequence (default: the stack's calib_seq_len or train_seq_len)")
    bg.add_argument("--kv-cache", default="off,exact,approximate", help="generation modes to time, comma-separated (default: all three)")
    bg.add_argument("--no-quantize", action="store_true", help="skip the GPTQ pass itself")
    bg.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    bg.set_defaults(func=cmd_bench_gptq)

    lst = sub.add_parser("list", parents=[common], help="registered techniques by slot")
    lst.add_argument("--slot", help="only this slot")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", parents=[common], help="a technique's parameters, defaults and example")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)

    stacks = sub.add_parser("stacks", parents=[common], help="bundled stacks and their reported val_bpb")
    stacks.set_defaults(func=cmd_stacks)

    schema = sub.add_parser("schema", parents=[common], help="JSON Schema of the stack format with the installed techniques' fields")
    schema.set_defaults(func=cmd_schema)

    report = sub.add_parser("report", parents=[common], help="(re)write report.md and loss.png of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", parents=[common], help="table and overlaid loss curves of several runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--plot", default="compare.png", help="where to write the overlaid plot (default: compare.png)")
    compare.add_argument("--no-plot", action="store_true", help="only the table")
    compare.set_defaults(func=cmd_compare)

    sig = sub.add_parser("significance", parents=[common], help="the record test: Welch t-test of an improvement over baseline runs")
    sig.add_argument("runs", nargs="+", metavar="RUN_DIR", help="candidate runs (one per seed)")
    sig.add_argument("--baseline", nargs="+", required=True, metavar="RUN_DIR", help="baseline runs (one per seed)")
    sig.add_argument("--metric", choices=("val_loss", "val_bpb"), default="val_loss", help="the challenge's rule is in nats (val_loss)")
    sig.add_argument("--delta", type=float, default=0.005, help="required improvement (default 0.005)")
    sig.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    sig.set_defaults(func=cmd_significance)

    ledger = sub.add_parser("ledger", parents=[common], help="every finished or failed run of an out_dir, grouped by recipe with its seeds")
    ledger.add_argument("--out-dir", default="runs", help="the runs' out_dir, holding ledger.jsonl (default: runs)")
    ledger.add_argument("--file", help="a ledger file elsewhere (overrides --out-dir)")
    ledger.add_argument("--json", action="store_true", help="the records as a JSON list")
    ledger.set_defaults(func=cmd_ledger)

    data = sub.add_parser("data", help="challenge data: download shards and tokenizers")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dl = data_sub.add_parser("download", parents=[common], help="fetch the published FineWeb shards and tokenizer from the Hugging Face Hub")
    dl.add_argument("--variant", default="sp1024", help="sp1024, sp4096 (sp<VOCAB_SIZE>) or byte260 (default sp1024)")
    dl.add_argument("--train-shards", type=int, default=80, help="training shards, a prefix of the export (default 80 = 8B tokens)")
    dl.add_argument("--dir", default="data", help="destination; files land in DIR/datasets/ and DIR/tokenizers/ (default ./data)")
    dl.add_argument("--endpoint", help="Hub base URL (default: $HF_ENDPOINT or https://huggingface.co)")
    dl.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf"), help="dataset repo")
    dl.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets"), help="export root inside the repo")
    dl.add_argument("--revision", help="branch, tag or commit of the dataset repo (default: main)")
    dl.add_argument("--cache-dir", help="Hugging Face cache directory (default: the Hub's own)")
    dl.set_defaults(func=cmd_data_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_rank = int(os.environ.get("RANK", "0")) != 0
    try:
        return int(args.func(args) or 0)
    except PgolfError as exc:
        if getattr(args, "debug", False):
            raise
        if not quiet_rank:
            for problem in exc.problems:  # one line each, even when a quoted value spans lines
                print("error: " + " ".join(part.strip() for part in problem.splitlines()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `pgolf list | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        text = str(exc).strip().splitlines()
        print(f"error: internal error: {type(exc).__name__}: {text[0] if text else ''} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
