"""``pgolf sweep``: run a stack under several seeds (one ``pgolf run`` each, one run directory per seed) and print
the mean and spread of the final scores; the sweep directory then goes straight into ``pgolf significance``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import add_stack_args, add_threads_arg, add_toy_arg, check_buildable, load_stack_and_registry, parse_nproc


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..config.load import parse_set
    from ..rundir import new_run_id
    from ..sweep import format_summary, parse_seeds, run_sweep

    seeds = parse_seeds(args.seeds)
    for expr in args.set or []:
        if parse_set(expr)[0] in (["run", "seed"], ["run", "run_id"], ["run", "out_dir"]):
            raise ConfigError(f"--set {expr}: the sweep sets run.seed, run.run_id and run.out_dir for each seed; drop this --set")
    parse_nproc(args.nproc_per_node)
    stack, registry = load_stack_and_registry(args)  # a bad stack fails here, once, before any seed runs
    check_buildable(stack, registry)
    out_dir = Path(args.out_dir or stack.run.out_dir)
    sweep_dir = out_dir / (args.sweep_id or new_run_id(f"{stack.meta.name or Path(stack.path).stem}-sweep"))
    if sweep_dir.exists() and not args.sweep_id:
        raise ConfigError(f"sweep directory {sweep_dir} already exists; pass --sweep-id to continue it")

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    manifest, code = run_sweep(args, stack, seeds, sweep_dir, echo)
    print("\n".join(format_summary(manifest, sweep_dir)))
    return code


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    sweep = sub.add_parser("sweep", parents=[common], help="run a stack under several seeds; mean and spread of the final scores")
    add_stack_args(sweep)
    add_toy_arg(sweep)
    add_threads_arg(sweep)
    sweep.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 1337,42,2025 (each run sets run.seed)")
    sweep.add_argument("--nproc-per-node", default="auto", help="processes per run, as for pgolf run ('auto' = number of GPUs, 1 on CPU)")
    sweep.add_argument("--out-dir", help="parent of the sweep directory (default: run.out_dir)")
    sweep.add_argument("--sweep-id", help="the sweep directory's name under the out dir; an existing one is continued (seeds with a run directory are kept)")
    sweep.set_defaults(func=cmd_sweep)
