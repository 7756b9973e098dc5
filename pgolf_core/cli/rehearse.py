"""``pgolf rehearse``: the whole pipeline on the CPU under the CUDA policy (bf16, fullgraph compile with a cheap
backend), reporting each compiled function's graphs, recompiles and graph breaks; it fails when one would hit its
recompile limit or comes within two graphs of it. The rehearsal itself lives in ``pgolf_core.rehearse``."""

from __future__ import annotations

import argparse
import os
import sys

from .common import add_stack_args, add_threads_arg, check_buildable, registry_for, resolve_stack_path


def cmd_rehearse(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..procenv import read_process_env
    from ..rehearse import MARGIN, RehearsalError, format_rehearsal, rehearsal_stack, rehearse
    from ..threads import configure

    if read_process_env().distributed:
        raise ConfigError("pgolf rehearse runs in one process; run it without torchrun")
    if args.val_tokens is not None and args.val_tokens < 2:
        raise ConfigError(f"--val-tokens {args.val_tokens}: must be at least 2 (one input and its target)")
    registry = registry_for(args)
    env = dict(os.environ) if args.legacy_env else None
    stack = rehearsal_stack(resolve_stack_path(args.stack), registry, args.set or [], legacy_env=env)
    check_buildable(stack, registry)
    line = configure(stack, args.threads)
    if line:
        print(line, file=sys.stderr)
    echo = (lambda message: print(f"run: {message}", file=sys.stderr)) if args.verbose else None
    kwargs = {} if args.val_tokens is None else {"val_tokens": args.val_tokens}
    result = rehearse(stack, registry, backend=args.backend, log=echo, **kwargs)
    print(format_rehearsal(result, stack), end="")
    problems = result.problems()
    if problems:
        raise RehearsalError(*problems)
    print(f"rehearsal: ok, every compiled function at least {MARGIN} graphs below run.recompile_limit = {result.limit}")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "rehearse", parents=[common],
        help="run a stack at toy size on the CPU as CUDA would (bf16, torch.compile); report graphs and recompiles per compiled function",
    )
    add_stack_args(p)
    add_threads_arg(p)
    p.add_argument(
        "--backend", default="aot_eager", choices=("aot_eager", "eager"),
        help="torch.compile backend: aot_eager (default; traces forward and backward as inductor would) or eager (dynamo only, faster); "
        "the guards and recompiles are the same",
    )
    p.add_argument(
        "--val-tokens", type=int, metavar="N",
        help="validation tokens evaluated (default: a full validation batch and half of another, the two shapes a split gives)",
    )
    p.add_argument("--verbose", action="store_true", help="echo the rehearsed run's log lines to stderr")
    p.set_defaults(func=cmd_rehearse)
