"""The ``pgolf`` command: run, sweep, validate, config, export, bench, rehearse, list, show, stacks, schema, report, compare, significance,
ledger, data, plus the commands installed plugins add (``pgolf_add_commands``; the gptq plugin's bench-gptq).

Every user error is printed as one line per problem on stderr (``error: …``) with exit code 2 (3 for an
artifact over the cap) and no traceback; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import OutputClosedError, PgolfError
from ..procenv import quiet_rank
from . import bench, config, data, export, ledger, list_cmd, rehearse, report, run, schema, show, significance, stacks, sweep, validate

# The order here is the order of ``pgolf --help``.
COMMANDS = (run, sweep, validate, config, export, bench, rehearse, list_cmd, show, stacks, schema, report, significance, ledger, data)


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
    quiet = quiet_rank()
    debug = getattr(args, "debug", False)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # output still buffered for a pipe: a reader that left is seen here, not at exit
        return code
    except OutputClosedError as exc:
        _silence_stdout()
        _print_errors(exc.problems, quiet)
        return exc.exit_code
    except PgolfError as exc:
        if debug:
            raise
        _print_errors(exc.problems, quiet)
        return exc.exit_code
    except KeyboardInterrupt:
        _print_errors(["interrupted"], quiet)
        return 130
    except BrokenPipeError:  # e.g. `pgolf list | head`: the reader left; say so by the exit code (128 + SIGPIPE)
        _silence_stdout()
        return 141
    except SystemExit as exc:  # a plugin's sys.exit: pgolf's own commands return their codes
        culprit = _culprit(exc)
        if culprit is None or debug:
            raise
        _print_errors([f"internal error: {culprit} called sys.exit({exc.code!r}) (rerun with --debug for the traceback)"], quiet)
        return 1
    except Exception as exc:
        if debug:
            raise
        text = str(exc).strip().splitlines()
        culprit = _culprit(exc)
        where = f" in {culprit}" if culprit else ""
        _print_errors([f"internal error{where}: {type(exc).__name__}: {text[0] if text else ''} (rerun with --debug for the traceback)"], quiet)
        return 1


def _print_errors(problems: list[str], quiet: bool) -> None:
    """One ``error:`` line per problem, even when a quoted value spans lines; nothing from ranks other than 0."""
    if quiet:
        return
    for problem in problems:
        try:
            print("error: " + " ".join(part.strip() for part in problem.splitlines()), file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _culprit(exc: BaseException) -> str | None:
    """The plugin whose code raised ``exc`` (the innermost frame in a loaded plugin's module), as
    ``plugin <distribution> <version> (<module>)``; None when pgolf's own code raised it."""
    from .. import registry as registry_module

    reg = registry_module._DEFAULT
    if reg is None:
        return None
    owners: dict[str, str] = {}
    for r in reg.all():
        owners.setdefault(r.module, f"{r.distribution} {r.version}".strip())
    for name, plugin in reg.pm.list_name_plugin():
        module = getattr(plugin, "__name__", None)
        if isinstance(module, str) and module not in owners and not module.startswith("pgolf_core"):
            owners[module] = name.split(":")[0]
    tb, found = exc.__traceback__, None
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        for owner_module, owner in owners.items():
            if module == owner_module or module.startswith(owner_module + "."):
                where = owner_module if owner != owner_module else tb.tb_frame.f_globals.get("__file__") or owner_module
                found = f"plugin {owner} ({where})"
        tb = tb.tb_next
    return found
