"""The ``pgolf`` command: run, sweep, validate, config, export, bench, list, show, stacks, schema, report, compare, significance,
ledger, data, plus the commands installed plugins add (``pgolf_add_commands``; the gptq plugin's bench-gptq).

Every user error is printed as one line per problem on stderr (``error: …``) with exit code 2 (3 for an
artifact over the cap) and no traceback; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import PgolfError
from . import bench, config, data, export, ledger, list_cmd, report, run, schema, show, significance, stacks, sweep, validate

# The order here is the order of ``pgolf --help``.
COMMANDS = (run, sweep, validate, config, export, bench, list_cmd, show, stacks, schema, report, significance, ledger, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter-golf recipes as plugins and stack files.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--plugin", action="append", metavar="MODULE", help="load a local plugin module (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub, common)
    from ..registry import default_registry

    default_registry().pm.hook.pgolf_add_commands(subparsers=sub, common=common)
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
