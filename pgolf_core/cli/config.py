"""``pgolf config``: print the resolved stack (TOML or JSON), its differences from another stack, or the
reference script's environment for it: one resolution, several views."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from .common import add_stack_args, add_toy_arg, load_stack_and_registry, resolve_stack_path


def cmd_config(args: argparse.Namespace) -> int:
    from ..config.dump import stack_to_dict, stack_to_toml

    if args.as_env and (args.diff or args.format != "toml"):
        raise ConfigError("--as-env prints NAME=value lines; it does not combine with --diff or --format")
    stack, registry = load_stack_and_registry(args)
    if args.diff:
        from ..config import load_stack
        from ..config.diff import diff_stacks, format_diff

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
    from ..envexport import stack_to_env

    exported = stack_to_env(stack, registry)
    for line in exported.lines():
        print(line)
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    config = sub.add_parser("config", parents=[common], help="print the resolved stack")
    add_stack_args(config)
    add_toy_arg(config)
    config.add_argument("--format", choices=("toml", "json"), default="toml")
    config.add_argument("--diff", metavar="OTHER", help="print only the resolved keys whose values differ from stack OTHER (old -> new)")
    config.add_argument("--as-env", action="store_true", help="print the reference script's environment variables for the stack (inverse of --legacy-env)")
    config.set_defaults(func=cmd_config)
