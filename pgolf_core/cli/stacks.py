"""``pgolf stacks``: the bundled stacks and their reported val_bpb, read from each file's ``[meta]`` table
without resolving the stacks (no registry, no plugins)."""

from __future__ import annotations

import argparse

from ..config.bundled import bundled_dir


def cmd_stacks(args: argparse.Namespace) -> int:
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    for path in sorted(bundled_dir().glob("*.toml")):
        meta = tomllib.loads(path.read_text(encoding="utf-8")).get("meta", {})
        bpb = meta.get("reported_val_bpb")
        print(f"{path.stem:<12} {meta.get('name', '')}  reported val_bpb {bpb if bpb is not None else '-'}")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    stacks = sub.add_parser("stacks", parents=[common], help="bundled stacks and their reported val_bpb")
    stacks.set_defaults(func=cmd_stacks)
