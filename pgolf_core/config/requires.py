"""``[requires] plugins = ["pgolf-xsa>=0.2"]``: the plugin distributions a stack needs, checked before its techniques.

A stack that uses a third-party technique says which distribution provides it, so a missing or outdated
plugin is reported as "install X" rather than as an unknown technique (pytest's ``required_plugins``).
Requirements are ``name`` plus optional comma-separated ``op version`` clauses (``==``, ``!=``, ``>=``,
``<=``, ``>``, ``<``, ``~=``) over numeric release segments; pre-release and local tags are ignored.
"""

from __future__ import annotations

import importlib.metadata as md
import operator
import re
from typing import Any

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")
_CLAUSE = re.compile(r"\s*(==|!=|>=|<=|~=|>|<)\s*(\d+(?:\.\d+)*)\s*$")
_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def normalize(name: str) -> str:
    """PEP 503 name normalisation: ``Pgolf_XSA`` and ``pgolf-xsa`` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
    """``"pgolf-xsa>=0.2,<1"`` → ``("pgolf-xsa", [(">=", (0, 2)), ("<", (1,))])``; ``ValueError`` if malformed."""
    m = _NAME.fullmatch(text)
    if not m:
        raise ValueError(text)
    name, rest = m.group(1), m.group(2).strip()
    clauses = []
    for part in rest.split(",") if rest else []:
        c = _CLAUSE.fullmatch(part)
        if not c:
            raise ValueError(text)
        clauses.append((c.group(1), release(c.group(2))))
    return name, clauses


def release(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else (0,)


def satisfies(version: tuple[int, ...], clauses: list[tuple[str, tuple[int, ...]]]) -> bool:
    for op, wanted in clauses:
        width = max(len(version), len(wanted))
        have, want = version + (0,) * (width - len(version)), wanted + (0,) * (width - len(wanted))
        if op == "~=":
            prefix = wanted[:-1] if len(wanted) > 1 else wanted
            if not (have >= want and version[: len(prefix)] == prefix):
                return False
        elif not _OPS[op](have, want):
            return False
    return True


def check_required_plugins(requirements: list[str], registry: Any) -> list[str]:
    """One message per unmet requirement, each naming the distribution and the command that fixes it."""
    loaded = {normalize(name.split(":", 1)[0]) for name, _ in registry.pm.list_name_plugin() if name and ":" in name}
    loaded |= {normalize(r.distribution) for r in registry.all()}
    failed = {normalize(f.distribution.rsplit(" ", 1)[0]): f.error for f in registry.failures}
    problems = []
    for text in requirements:
        try:
            name, clauses = parse_requirement(text)
        except ValueError:
            problems.append(f"bad requirement '{text}'; write 'name', 'name>=1.2' or 'name>=1.2,<2'")
            continue
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"plugin distribution '{name}' is not installed; install it: pip install '{text}'")
            continue
        if not satisfies(release(installed), clauses):
            problems.append(f"plugin distribution '{name}' {installed} is installed, the stack needs '{text}'; pip install -U '{text}'")
        elif normalize(name) in failed:
            problems.append(f"plugin distribution '{name}' {installed} failed to load: {failed[normalize(name)]} (see 'pgolf list')")
        elif normalize(name) not in loaded and normalize(name) != "pgolf":
            problems.append(
                f"plugin distribution '{name}' {installed} is installed but not loaded; check PGOLF_DISABLE_PLUGIN_AUTOLOAD, "
                "PGOLF_LOAD_PLUGINS and PGOLF_BLOCK_PLUGINS"
            )
    return problems
