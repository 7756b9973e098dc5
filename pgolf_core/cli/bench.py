"""``pgolf bench``: the command's options and a thin wrapper; the timing itself lives in ``pgolf_core.bench``,
imported only when the command runs."""

from __future__ import annotations

import argparse
import os

from .common import add_stack_args, add_threads_arg, add_toy_arg, check_output_file, load_stack_and_registry, parse_nproc


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import cmd_bench as bench

    check_output_file("--json", args.json)
    stack, registry = load_stack_and_registry(args)
    nproc = parse_nproc(args.nproc_per_node)
    args.threads_line = None
    if nproc == 1 or "RANK" in os.environ:  # the processes a multi-process bench launches choose their own
        from ..threads import configure

        line = configure(stack, args.threads)
        args.threads_line = line if int(os.environ.get("RANK", "0")) == 0 else None  # printed once the arguments are checked
    return bench(args, stack, registry, nproc)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", parents=[common], help="time training steps: step time, tokens/s, memory, MFU; optionally vs a reference script")
    add_stack_args(bench)
    add_toy_arg(bench)
    add_threads_arg(bench)
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
