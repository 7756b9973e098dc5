"""``pgolf show``: one technique's parameters with their defaults, units and legacy environment names, the sites
and parts it hosts or what it acts on (``pgolf_core.hooks_doc``), and its example; an unknown name gets a
did-you-mean."""

from __future__ import annotations

import argparse
from typing import Any

import attrs

from ..errors import ConfigError
from .common import registry_for


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def cmd_show(args: argparse.Namespace) -> int:
    from ..hooks_doc import show_lines

    registry = registry_for(args)
    regs = registry.find(args.name)
    if not regs:
        from ..config.convert import did_you_mean

        names = sorted({r.technique.name for r in registry.all()})
        raise ConfigError(f"no technique named '{args.name}'{did_you_mean(args.name, names)}; see 'pgolf list'")
    for r in regs:
        t = r.technique
        print(f"{t.name}  (slot {t.slot}; {r.distribution} {r.version}; module {r.module})")
        print(f"  {t.summary}")
        if t.source:
            print(f"  source: {t.source}")
        if t.requires:
            print(f"  requires: {', '.join(t.requires)}")
        if t.conflicts:
            print(f"  conflicts: {', '.join(t.conflicts)}")
        if not t.compile_safe:
            print("  compile_safe: no (the model runs eager when this technique is used)")
        fields = attrs.fields(t.params)
        print("  parameters:" if fields else "  parameters: none")
        for a in fields:
            default = "required" if a.default is attrs.NOTHING else repr(a.default)
            extra = []
            if a.metadata.get("unit"):
                extra.append(f"unit {a.metadata['unit']}")
            if a.metadata.get("env"):
                env = a.metadata["env"]
                extra.append(f"legacy env {env if isinstance(env, str) else ' / '.join(env)}")
            tail = f" [{'; '.join(extra)}]" if extra else ""
            print(f"    {a.name}: {_type_name(a.type)} = {default}  {a.metadata.get('help', '')}{tail}")
        for line in show_lines(registry, r):
            print(f"  {line}")
        if t.example:
            print("  example:")
            for line in t.example.splitlines():
                print(f"    {line}")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    show = sub.add_parser("show", parents=[common], help="a technique's parameters, defaults and example")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)
