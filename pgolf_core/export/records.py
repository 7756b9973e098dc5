"""The records folder the challenge accepts: ``train_gpt.py`` (the only code it counts), ``README.md``,
``submission.json``, ``requirements.txt`` and, for a finished run, ``train.log``.

Written into a temporary directory next to the destination and renamed into place, so a folder is either
complete or absent.
"""

from __future__ import annotations

import ast
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .bundle import installed_modules, script_source

def requirements(source: str) -> list[str]:
    """The distributions the exported script imports, found from its import statements (the standard library
    aside): what a record's ``requirements.txt`` names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            tops = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [node.module.split(".")[0]]
        else:
            continue
        for top in tops:
            if top not in sys.stdlib_module_names:
                found.update(installed_modules().get(top, [top]))
    return sorted(found, key=str.lower)


def _technique_rows(stack: Any, registry: Any) -> list[str]:
    rows = []
    for slot, choice in stack.slots.items():
        reg = registry.get(slot, choice.technique)
        rows.append(f"| {slot} | `{choice.technique}` | {reg.technique.summary} | {reg.technique.source or '-'} |")
    for i, mod in enumerate(stack.modifiers):
        reg = registry.get("modifier", mod.technique)
        rows.append(f"| modifier[{i}] layers={mod.layers!r} | `{mod.technique}` | {reg.technique.summary} | {reg.technique.source or '-'} |")
    return rows


def readme(stack: Any, registry: Any, code_bytes: int, run: dict[str, Any] | None, packages: list[str]) -> str:
    meta = stack.meta
    name = meta.name or Path(stack.path).stem
    lines = [f"# {name}", ""]
    if meta.description:
        lines += [meta.description, ""]
    lines += [
        "## Run",
        "",
        "```",
        "torchrun --standalone --nproc_per_node=8 train_gpt.py",
        "```",
        "",
        "The recipe's settings are the script's defaults; the reference environment variables (`NUM_LAYERS`, "
        "`ITERATIONS`, `DATA_PATH`, ...) override them. `DATA_PATH` and `TOKENIZER_PATH` point at the challenge's "
        "shards and tokenizer.",
        "",
    ]
    if run is not None:
        summary = run.get("summary", {})
        sub = run.get("submission", {})
        lines += ["## Result", "", "| | |", "|---|---|"]
        lines += [f"| val_bpb | {sub.get('val_bpb')} |", f"| val_loss | {sub.get('val_loss')} |"]
        lines += [f"| score line | `{summary.get('score_line', '-')}` |", f"| seed | {summary.get('seed', '-')} |"]
        lines += [f"| steps | {summary.get('steps', '-')} |", f"| model bytes | {summary.get('bytes_model', '-')} |"]
        lines += [f"| code bytes | {code_bytes} |", f"| total bytes | {summary.get('bytes_model', 0) + code_bytes if summary else '-'} |", ""]
    else:
        lines += ["## Size", "", f"`train_gpt.py` is {code_bytes} bytes (counted as code).", ""]
    lines += ["## Techniques", "", "| where | technique | what | source |", "|---|---|---|---|", *_technique_rows(stack, registry), ""]
    lines += [
        "## Code",
        "",
        "`train_gpt.py` is the code this recipe runs, cut from the pgolf implementation of its techniques, minified, "
        "LZMA-compressed and base85-encoded inside a two-line `exec` wrapper (as records since #1394 do). It imports "
        f"only the standard library and {', '.join(packages)} (requirements.txt).",
        "",
    ]
    return "\n".join(lines)


def submission(stack: Any, code_bytes: int, run: dict[str, Any] | None) -> dict[str, Any]:
    meta = stack.meta
    out = {
        "author": meta.author,
        "github_id": meta.github_id,
        "name": meta.name or Path(stack.path).stem,
        "blurb": meta.description,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bytes_code": code_bytes,
    }
    if run is not None:
        sub, summary = run.get("submission", {}), run.get("summary", {})
        out.update(val_loss=sub.get("val_loss"), val_bpb=sub.get("val_bpb"), date=sub.get("date", out["date"]))
        if summary.get("bytes_model") is not None:
            out["bytes_total"] = summary["bytes_model"] + code_bytes
    return out


def write_records(dest: Path, stack: Any, registry: Any, *, packed: bool = True, run_dir: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write the records folder for ``stack`` (from ``run_dir``'s results when given) at ``dest``; returns what
    was written with the counted code bytes."""
    from . import packed_script

    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"-o {dest}: is a file, not a folder; choose a folder path (the records folder is created there)")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise ConfigError(f"-o {dest}: exists and is not empty; choose another folder or pass --force to replace it")
    from ..sample import build_sample, is_sample

    if is_sample(str(stack.data.path)):
        build_sample(str(stack.data.path))  # the script reads the shards the stack data names
    source = script_source(stack, registry)
    script = packed_script(stack, registry) if packed else source
    code = len(script.encode("utf-8"))
    run = None
    if run_dir is not None:
        run = {
            "summary": json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {},
            "submission": json.loads((run_dir / "submission.json").read_text()) if (run_dir / "submission.json").is_file() else {},
        }
    packages = requirements(source)
    files = {
        "train_gpt.py": script,
        "README.md": readme(stack, registry, code, run, packages),
        "submission.json": json.dumps(submission(stack, code, run), indent=2) + "\n",
        "requirements.txt": "\n".join(packages) + "\n",
    }
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise ConfigError(f"-o {dest}: cannot write there ({exc.strerror or exc}); choose a writable folder") from None
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if run_dir is not None and (run_dir / "log.txt").is_file():
            shutil.copyfile(run_dir / "log.txt", tmp / "train.log")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"-o {dest}: cannot write the records folder ({exc.strerror or exc}); choose a writable folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dest": dest, "code_bytes": code, "files": sorted(p.name for p in dest.iterdir())}
