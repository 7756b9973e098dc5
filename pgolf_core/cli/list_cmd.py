"""``pgolf list``: the registered techniques by slot, with the sites and parts of host techniques
(``pgolf_core.hooks_doc``), and plugins that failed to load; ``--json`` for tools. Named ``list_cmd`` so the
package never holds an attribute ``list`` that shadows the builtin."""

from __future__ import annotations

import argparse
import json

import attrs

from ..errors import ConfigError
from .common import registry_for


def cmd_list(args: argparse.Namespace) -> int:
    from ..hookspecs import SLOTS

    from ..hooks_doc import interface_fields, list_line

    if args.slot and args.slot not in SLOTS:
        from ..config.convert import did_you_mean

        raise ConfigError(f"--slot {args.slot}: unknown slot{did_you_mean(args.slot, list(SLOTS))}; slots: {', '.join(SLOTS)}")
    registry = registry_for(args)
    regs = [r for r in registry.all() if not args.slot or r.technique.slot == args.slot]
    hosts = {id(r): interface_fields(registry, r) for r in regs}
    if args.json:
        out = {
            "techniques": [
                {
                    "name": r.technique.name,
                    "slot": r.technique.slot,
                    "distribution": r.distribution,
                    "version": r.version,
                    "module": r.module,
                    "summary": r.technique.summary,
                    "source": r.technique.source,
                    "requires": list(r.technique.requires),
                    "conflicts": list(r.technique.conflicts),
                    "compile_safe": r.technique.compile_safe,
                    "example": r.technique.example,
                    "parameters": [a.name for a in attrs.fields(r.technique.params)],
                    **hosts[id(r)],
                }
                for r in regs
            ],
            "failed": [attrs.asdict(f) for f in registry.failures],
        }
        print(json.dumps(out, indent=2))
        return 0
    for slot in SLOTS:
        rows = [r for r in regs if r.technique.slot == slot]
        if not rows:
            continue
        print(f"{slot}:")
        for r in rows:
            params = ", ".join(a.name for a in attrs.fields(r.technique.params)) or "-"
            print(f"  {r.technique.name:<16} {r.distribution} {r.version}  {r.technique.summary}")
            print(f"  {'':<16} params: {params}")
            if line := list_line(hosts[id(r)], r.technique.name):
                print(f"  {'':<16} {line}")
            if r.technique.source:
                print(f"  {'':<16} source: {r.technique.source}")
    for f in registry.failures:
        print(f"failed plugin {f.distribution} ({f.entry_point}): {f.error}")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    lst = sub.add_parser("list", parents=[common], help="registered techniques by slot")
    lst.add_argument("--slot", help="only this slot")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
