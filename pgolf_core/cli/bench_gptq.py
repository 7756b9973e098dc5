"""``pgolf bench-gptq``: the command's options and a thin wrapper; the timing of GPTQ's calibration lives in
``pgolf_core.bench_gptq``, imported only when the command runs."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import add_stack_args, check_output_file, load_stack_and_registry


def cmd_bench_gptq(args: argparse.Namespace) -> int:
    from ..bench_gptq import dump, format_gptq_bench, run_gptq_bench

    check_output_file("--json", args.json)
    stack, registry = load_stack_and_registry(args)
    modes = [m.strip() for m in args.kv_cache.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("exact", "approximate", "off")]
    if bad or not modes:
        raise ConfigError(f"--kv-cache {args.kv_cache}: expected a comma list of exact, approximate, off")
    result = run_gptq_bench(stack, registry, device=args.device, seqs=args.seqs, seq_len=args.seq_len, modes=modes, quantize=not args.no_quantize)
    print(format_gptq_bench(result))
    if args.json:
        dump(result, args.json)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    bg = sub.add_parser("bench-gptq", parents=[common], help="time GPTQ's self-generated calibration, Hessians and quantization for a stack's model")
    add_stack_args(bg)
    bg.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="where generation and Hessians run (default: cuda when present)")
    bg.add_argument("--seqs", type=int, help="calibration sequences (default: the stack's calib_seqs)")
    bg.add_argument("--seq-len", type=int, help="tokens per sequence (default: the stack's calib_seq_len or train_seq_len)")
    bg.add_argument("--kv-cache", default="off,exact,approximate", help="generation modes to time, comma-separated (default: all three)")
    bg.add_argument("--no-quantize", action="store_true", help="skip the GPTQ pass itself")
    bg.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    bg.set_defaults(func=cmd_bench_gptq)
