"""``pgolf schema``: the JSON Schema of the stack format, built from the installed techniques' fields so an
editor can check and complete stacks that use plugins."""

from __future__ import annotations

import argparse
import json

from .common import registry_for


def cmd_schema(args: argparse.Namespace) -> int:
    from ..config.json_schema import stack_schema

    print(json.dumps(stack_schema(registry_for(args)), indent=2))
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    schema = sub.add_parser("schema", parents=[common], help="JSON Schema of the stack format with the installed techniques' fields")
    schema.set_defaults(func=cmd_schema)
