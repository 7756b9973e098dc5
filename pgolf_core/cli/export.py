"""``pgolf export STACK|RUN_DIR -o DIR``: the records folder the challenge accepts, its single ``train_gpt.py``
holding the code the stack runs (packed by default, ``--no-pack`` for the readable form that behaves the same).
A run directory exports its resolved stack with its results and log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import add_stack_args, add_toy_arg, load_stack_and_registry, registry_for


def cmd_export(args: argparse.Namespace) -> int:
    from ..config import load_stack
    from ..export.records import write_records

    source = Path(args.stack)
    run_dir = None
    if source.is_dir():
        if not (source / "stack.toml").is_file():
            raise ConfigError(f"{source}: not a pgolf run directory (no stack.toml); give a stack file or a finished run's directory")
        if args.legacy_env or args.toy:
            raise ConfigError("--legacy-env and --toy apply to a stack, not to a run directory (its stack is already resolved)")
        if source.name.endswith(".partial") or ".failed" in source.name or not (source / "submission.json").is_file():
            raise ConfigError(
                f"{source}: the run did not finish (no submission.json), so it has no results to submit; resume it "
                f"(pgolf run STACK --resume {source}) or export its stack: pgolf export {source / 'stack.toml'} -o DIR"
            )
        run_dir = source
        registry = registry_for(args)
        stack = load_stack(source / "stack.toml", registry, overrides=args.set or [])
    else:
        stack, registry = load_stack_and_registry(args)
    result = write_records(Path(args.output), stack, registry, packed=not args.no_pack, run_dir=run_dir, force=args.force)
    form = "packed" if not args.no_pack else "readable"
    print(f"{result['dest']}: {', '.join(result['files'])}")
    print(f"code_bytes:{result['code_bytes']} ({form} train_gpt.py)")
    print(f"run it: cd {result['dest']} && torchrun --standalone --nproc_per_node=8 train_gpt.py", file=sys.stderr)
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser("export", parents=[common], help="write a records folder (train_gpt.py, README.md, submission.json, ...) for a stack or a finished run")
    add_stack_args(export)
    add_toy_arg(export)
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="the records folder to write (must be new or empty)")
    export.add_argument("--no-pack", action="store_true", help="write the readable script instead of the packed one (same behaviour)")
    export.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    export.set_defaults(func=cmd_export)
