"""``pgolf ledger``: every finished or failed run of an out_dir from its ledger.jsonl, grouped by recipe with
its seeds; unreadable lines are skipped with a warning rather than failing the listing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_ledger(args: argparse.Namespace) -> int:
    from ..ledger import FILENAME, format_table, read

    path = Path(args.file) if args.file else Path(args.out_dir) / FILENAME
    records, bad = read(path)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{path}: {len(records)} runs")
        print(format_table(records), end="")
    if bad:
        print(f"warning: {path}: {bad} unreadable line(s) skipped", file=sys.stderr)
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    ledger = sub.add_parser("ledger", parents=[common], help="every finished or failed run of an out_dir, grouped by recipe with its seeds")
    ledger.add_argument("--out-dir", default="runs", help="the runs' out_dir, holding ledger.jsonl (default: runs)")
    ledger.add_argument("--file", help="a ledger file elsewhere (overrides --out-dir)")
    ledger.add_argument("--json", action="store_true", help="the records as a JSON list")
    ledger.set_defaults(func=cmd_ledger)
