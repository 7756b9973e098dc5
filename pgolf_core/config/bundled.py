"""The stacks that ship with pgolf (package data of ``pgolf_core.stacks``; the repository's ``stacks/``).

A stack argument or an ``extends`` value that is not a file may name one: ``pgolf run pr400`` and
``extends = "pr1019"`` work from any directory, also from a wheel install.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_dir() -> Path:
    return Path(str(resources.files("pgolf_core.stacks")))


def bundled_names() -> list[str]:
    return sorted(p.stem for p in bundled_dir().glob("*.toml"))


def bundled_stack(name: str) -> Path | None:
    """The bundled stack called ``name`` (``pr400`` or ``pr400.toml``), or None."""
    stem = name[:-5] if name.endswith(".toml") else name
    if not stem or "/" in stem or "\\" in stem:
        return None
    path = bundled_dir() / f"{stem}.toml"
    return path if path.is_file() else None
