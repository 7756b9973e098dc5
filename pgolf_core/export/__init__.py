"""``pgolf export``: a stack (or a finished run) as the records folder the challenge accepts, whose single
``train_gpt.py`` holds exactly the code the stack runs (``bundle``), packed as the records pack theirs
(``pack``).

``code_bytes(stack, registry)`` is the size of that packed script: what every ``pgolf run`` counts as code
(before training, so the cap check and pruning targets use it) and what ``pgolf validate`` prints. It is a
pure function of the resolved stack and the source it bundles, so it is cached under that key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .bundle import script_source
from .pack import pack

__all__ = ["code_bytes", "packed_script", "script_source"]


def packed_script(stack: Any, registry: Any) -> str:
    return pack(script_source(stack, registry))


def _cache_dir() -> Path:
    explicit = os.environ.get("PGOLF_EXPORT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("PGOLF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pgolf")
    return Path(base) / "export"


def _source_key(stack: Any, registry: Any) -> str:
    """What the packed script depends on: the stack as data, every pgolf source file, the modules of the
    stack's techniques, the interpreter and the minifier."""
    from .bundle import env_table, stack_data

    digest = hashlib.sha256()
    digest.update(json.dumps([stack_data(stack), env_table(stack)], sort_keys=True, default=repr).encode())
    roots = {Path(__file__).resolve().parents[1], Path(importlib.util.find_spec("pgolf").origin).resolve().parent}
    plugins = importlib.util.find_spec("pgolf.plugins")
    roots |= {Path(p).resolve() for p in (plugins.submodule_search_locations or [])}
    files = sorted({f for root in roots for f in root.rglob("*.py")})
    for slot, choice in [*stack.slots.items(), *(("modifier", m) for m in stack.modifiers)]:
        reg = registry.get(slot, choice.technique)
        spec = importlib.util.find_spec(reg.module) if reg is not None else None
        if spec is not None and spec.origin:
            files.append(Path(spec.origin))
    for f in files:
        digest.update(str(f).encode() + b"\0" + f.read_bytes())
    try:
        import python_minifier

        digest.update(str(python_minifier.__version__ if hasattr(python_minifier, "__version__") else "").encode())
    except ImportError:
        pass
    digest.update(sys.version.encode())
    return digest.hexdigest()


def code_bytes(stack: Any, registry: Any) -> int:
    """Bytes of the packed export of ``stack``: the code the challenge counts."""
    key = _source_key(stack, registry)
    path = _cache_dir() / f"{key}.json"
    try:
        return int(json.loads(path.read_text())["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    size = len(packed_script(stack, registry).encode("utf-8"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bytes": size}))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time
    return size
