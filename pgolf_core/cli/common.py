"""What several commands share: the registry and the stack an invocation names, the stack arguments, the
meta-device build check. Heavy imports (torch, the model, the trainer) stay inside the functions, as in every command module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import attrs

from ..errors import ConfigError, PgolfError

def registry_for(args: argparse.Namespace):
    """The installed techniques plus any ``--plugin`` modules."""
    from ..registry import default_registry

    return default_registry(tuple(getattr(args, "plugin", None) or ()))


def bundled_stacks() -> list[str]:
    from ..config.bundled import bundled_names

    return bundled_names()


def resolve_stack_path(value: str) -> str:
    """A stack argument is a path, or the name of a bundled stack (``baseline`` → the installed baseline.toml); a
    name that is neither is one line with the closest bundled name."""
    from ..config.bundled import bundled_stack

    if Path(value).is_file():
        return value
    bundled = bundled_stack(value)
    if bundled is not None:
        return str(bundled)
    if value.endswith(".toml"):
        return value
    if "/" not in value and os.sep not in value:
        import difflib

        names = bundled_stacks()
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"{value}: no stack file or bundled stack of that name{hint}; bundled: {', '.join(names)} (see 'pgolf stacks')")
    return value


def load_stack_and_registry(args: argparse.Namespace):
    """The stack the arguments name, with ``--set``, ``--legacy-env``, ``--run-id`` and ``--out-dir`` applied, and its registry."""
    from ..config import load_stack

    registry = registry_for(args)
    env = dict(os.environ) if getattr(args, "legacy_env", False) else None
    path = resolve_stack_path(args.stack)
    if getattr(args, "toy", False):
        from ..toy import load_toy_stack

        stack, notes = load_toy_stack(path, registry, overrides=args.set or [], legacy_env=env)
        if int(os.environ.get("RANK", "0")) == 0:
            for note in notes:
                print(f"note: --toy: {note}", file=sys.stderr)
    else:
        stack = load_stack(path, registry, overrides=args.set or [], legacy_env=env)
    if getattr(args, "run_id", None) or getattr(args, "out_dir", None):
        changes = {}
        if getattr(args, "run_id", None):
            changes["run_id"] = args.run_id
        if getattr(args, "out_dir", None):
            changes["out_dir"] = args.out_dir
        try:  # the fields' validators: a run id is a name, a directory has no NUL
            stack = attrs.evolve(stack, run=attrs.evolve(stack.run, **changes))
        except (ValueError, TypeError) as exc:
            option = "--run-id" if str(exc).startswith("run_id") else "--out-dir"
            raise ConfigError(f"{option}: {exc}") from None
    return stack, registry


def check_buildable(stack, registry):
    """Build what a run builds from the stack alone (the model on the meta device, the schedule, averaging,
    quantizer, compressor, evaluator, tokenizer and loader objects), so settings a technique rejects, or an
    object that does not meet its slot's contract, fail as one line before anything starts, and refuse a model
    whose exact parameter count cannot fit in any process's memory (the meta device allocates nothing).
    Returns the model and the built slot objects."""
    import torch

    from ..config.checks import MAX_PROCESS_BYTES, check_memory
    from ..contracts import SLOT_CONTRACTS
    from ..model.gpt import build_model, count_parameters
    from ..train import build_slot, technique_table

    try:
        with torch.device("meta"):
            model, _ = build_model(stack, registry)
    except PgolfError:
        raise
    except Exception as exc:
        raise ConfigError(f"{stack.path}: the model does not build: {_first_line(exc)} (techniques: {technique_table(stack)})") from None
    check_memory(stack, MAX_PROCESS_BYTES, "any single process gets", params=count_parameters(model))
    built = {}
    for slot in ("schedule", "averaging", "quantizer", "compressor", "evaluator", "tokenizer", "loader"):
        try:
            built[slot] = build_slot(stack, registry, slot)
        except PgolfError:
            raise
        except Exception as exc:
            raise ConfigError(f"{stack.path}: {slot}({stack.technique(slot)}): {_first_line(exc)}") from None
        contract = SLOT_CONTRACTS[slot]
        if not contract.accepts(built[slot]):
            raise ConfigError(
                f"{stack.path}: {slot}({stack.technique(slot)}) built a {type(built[slot]).__name__}, which does not meet the "
                f"{slot} contract ({contract.returns}); see pgolf_core/contracts.py"
            )
    return model, built


def _first_line(exc: BaseException) -> str:
    """A technique's own words for a ValueError (it says what is wrong); the type too for anything else."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(exc, ValueError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def check_output_file(option: str, value: str | None) -> None:
    """A file the command will write (``--plot``, ``--json``): checked before any work, so an hour of
    benchmarking never ends in a traceback because the name is a directory or its folder is missing."""
    if not value or value == "-":
        return
    path = Path(value)
    if "\x00" in value:
        raise ConfigError(f"{option} {value!r}: a file name cannot hold a NUL character")
    if path.is_dir():
        raise ConfigError(f"{option} {value}: is a directory; give a file name (e.g. {path / 'out'})")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {value}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{option} {value}: cannot write into {parent} (permission denied)")


def parse_nproc(value: str) -> int:
    """``--nproc-per-node``: a positive integer, or 'auto' (the number of GPUs, 1 without)."""
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


def add_stack_args(p: argparse.ArgumentParser) -> None:
    """The stack positional and the options that change how it resolves (``--set``, ``--legacy-env``)."""
    p.add_argument("stack", help="stack file (or the name of a bundled stack, e.g. baseline)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, value parsed as TOML (repeatable)")
    p.add_argument("--legacy-env", action="store_true", help="apply reference-script environment variables (NUM_LAYERS, ...)")


def add_toy_arg(p: argparse.ArgumentParser) -> None:
    """``--toy``: the stack at CPU toy size on the built-in sample of its vocabulary (``pgolf_core.toy``)."""
    p.add_argument(
        "--toy", action="store_true",
        help="shrink the stack to CPU toy size on the built-in sample of its vocabulary, every switch point kept as a "
        "fraction of the run (offline; 'pgolf config STACK --toy' shows it); --set then changes the toy's values",
    )


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads``: intra-op CPU threads (``pgolf_core.threads``)."""
    p.add_argument(
        "--threads", type=int, metavar="N",
        help="CPU threads per process (default: the cores not busy with other work, divided among the processes; "
        "OMP_NUM_THREADS or PGOLF_THREADS also set it)",
    )
