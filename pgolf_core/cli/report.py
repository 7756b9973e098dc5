"""``pgolf report`` and ``pgolf compare``: (re)write one run's report.md and loss.png, or tabulate and plot
several runs; both read run directories through ``pgolf_core.report``, and a missing matplotlib only skips plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import check_output_file


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import NO_MATPLOTLIB, read_run, write_report

    md, png = write_report(args.run_dir)
    run = read_run(args.run_dir)
    if run.status != "complete":
        print(f"{args.run_dir}: {run.status}" + (f": {run.error}" if run.error else ""), file=sys.stderr)
    print(f"{md}")
    print(f"{png}" if png else f"loss.png skipped: {NO_MATPLOTLIB}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..report import NO_MATPLOTLIB, compare_table, plot_compare, read_run

    if not args.no_plot:
        check_output_file("--plot", args.plot)
    runs = [read_run(p) for p in args.runs]
    print(compare_table(runs), end="")
    if not args.plot:  # a picture only where asked for: nothing lands in the working directory unbidden
        return 0
    try:
        plot_compare(runs, Path(args.plot))
    except ImportError:
        print(f"plot skipped: {NO_MATPLOTLIB}", file=sys.stderr)
        return 0
    print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    report = sub.add_parser("report", parents=[common], help="(re)write report.md and loss.png of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", parents=[common], help="table and overlaid loss curves of several runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--plot", metavar="FILE", help="also draw the runs' train loss and val_bpb curves, overlaid, into FILE (.png)")
    compare.add_argument("--no-plot", action="store_true", help=argparse.SUPPRESS)  # the table alone is the default now
    compare.set_defaults(func=cmd_compare)
