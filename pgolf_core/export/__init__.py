"""``pgolf export``: a stack (or a finished run) as the records folder the challenge accepts, whose single
``train_gpt.py`` holds exactly the code the stack runs (``bundle``), packed as the records pack theirs
(``pack``).

``code_bytes(stack, registry)`` is the size of that packed script: what every ``pgolf run`` counts as code
(before training, so the cap check and pruning targets use it) and what ``pgolf validate`` prints. The script
is code (which depends only on the stack's techniques and the source they bundle) plus two data tables (the
stack's values). Bundling and minifying the code is the slow part, so its minified text is cached under the
techniques and the source; a stack that only changes numbers, paths or seeds splices its tables into the
cached code and compresses, in milliseconds. The packed script is the same either way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .bundle import code_key, data_lines, script_code, script_source, splice
from .pack import minify, wrap

__all__ = ["code_bytes", "packed_script", "script_source"]


def packed_script(stack: Any, registry: Any) -> str:
    """The packed ``train_gpt.py`` of ``stack``: minified code (cached) with its data tables, compressed."""
    return wrap(splice(_minified_code(stack, registry), data_lines(stack, compact=True)))


def code_bytes(stack: Any, registry: Any) -> int:
    """Bytes of the packed export of ``stack``: the code the challenge counts."""
    return len(packed_script(stack, registry).encode("utf-8"))


def _cache_dir() -> Path:
    explicit = os.environ.get("PGOLF_EXPORT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("PGOLF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pgolf")
    return Path(base) / "export"


def _code_key(stack: Any, registry: Any) -> str:
    """What the minified code depends on: the stack's techniques in order, every pgolf source file, the
    modules of those techniques (and their packages), the interpreter and the minifier."""
    digest = hashlib.sha256()
    digest.update(json.dumps(code_key(stack)).encode())
    roots = {Path(__file__).resolve().parents[1], Path(importlib.util.find_spec("pgolf").origin).resolve().parent}
    plugins = importlib.util.find_spec("pgolf.plugins")
    roots |= {Path(p).resolve() for p in (plugins.submodule_search_locations or [])}
    for slot, technique in code_key(stack):
        reg = registry.get(slot, technique)
        spec = importlib.util.find_spec(reg.module.split(".")[0]) if reg is not None else None
        if spec is not None and spec.origin:
            roots.add(Path(spec.origin).resolve().parent)
    for f in sorted({f for root in roots for f in root.rglob("*.py")}):
        digest.update(str(f).encode() + b"\0" + f.read_bytes())
    try:
        from importlib.metadata import version

        digest.update(version("python-minifier").encode())
    except Exception:  # noqa: BLE001 - not installed: pack() says so when it runs
        pass
    digest.update(sys.version.encode())
    return digest.hexdigest()


def _minified_code(stack: Any, registry: Any) -> str:
    key = _code_key(stack, registry)
    path = _cache_dir() / f"{key}.py"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    code = minify(script_code(stack, registry))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(code, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time
    return code
