"""The entry point of an exported ``train_gpt.py``: the stack baked in, the reference's environment variables
read on top, then the same trainer, export and evaluation code that ``pgolf run`` executes.

``pgolf export`` bundles this module with the rest of the code a stack runs (``pgolf_core.export``); it
imports only the standard library and what that code imports (torch, numpy, sentencepiece, the
compressor's library). Run as the records are (``torchrun --standalone --nproc_per_node=8 train_gpt.py``), it
logs the challenge's lines to stdout and ``logs/<RUN_ID>.txt`` and writes ``final_model.<quant>.ptz``.

The baked stack is plain data: ``{"path", "run", "data", "model", "meta": {field: value}, "slots": {slot:
[technique, {param: value}]}, "modifiers": [[technique, layers, {param: value}], ...]}``. The environment
table maps each variable ``--legacy-env`` knows to where it lands: ``[table, key, field, kind, mapping]`` with
``table`` one of run/data/model, ``slot`` (key: the slot) or ``modifier`` (key: its index).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .config.envvalues import parse_env_value
from .finalize import export_and_evaluate
from .runtime import setup_runtime
from .train import Trainer, load_data_files


class Params:
    """A technique's parameters as attributes (the exported script carries no attrs classes)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Params({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def params_factory(fields: list[str], defaults: dict[str, Any]) -> Callable[..., Params]:
    """A stand-in for an attrs class the bundled code constructs itself (a technique's params, a small record):
    its defaults baked, its fields accepted by position in declaration order or by name, as attrs accepts them."""
    return lambda *args, **values: Params(**{**defaults, **dict(zip(fields, args)), **values})


class Choice:
    def __init__(self, technique: str, params: Params, layers: Any = None) -> None:
        self.technique, self.params, self.layers = technique, params, layers


class Stack:
    """What the trainer reads of a resolved stack, with the same attribute names as ``pgolf_core.config.schema.Stack``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.path = data["path"]
        for table in ("meta", "run", "data", "model"):
            setattr(self, table, Params(**data[table]))
        self.slots = {slot: Choice(name, Params(**values)) for slot, (name, values) in data["slots"].items()}
        self.modifiers = tuple(Choice(name, Params(**values), layers) for name, layers, values in data["modifiers"])

    def technique(self, slot: str) -> str:
        return self.slots[slot].technique

    def params(self, slot: str) -> Any:
        return self.slots[slot].params


class Technique:
    def __init__(self, name: str, build: Callable[..., Any]) -> None:
        self.name, self.build = name, build


class Registration:
    def __init__(self, technique: Technique) -> None:
        self.technique = technique


class Registry:
    """The techniques this script was exported with, by (slot, name); no plugin observes the loop."""

    hooks = None

    def __init__(self, builds: dict[tuple[str, str], Callable[..., Any]]) -> None:
        self.entries = {key: Registration(Technique(key[1], build)) for key, build in builds.items()}

    def get(self, slot: str, name: str) -> Registration | None:
        return self.entries.get((slot, name))


def apply_environment(data: dict[str, Any], table: list[list[Any]], switches: list[list[Any]], env: dict[str, str]) -> dict[str, Any]:
    """The baked stack with the reference's variables applied as ``--legacy-env`` applies them: modifier switches
    (``enable`` 0 drops it) and layer selectors first, then every field's variable."""
    out = copy.deepcopy(data)
    from_env = []
    for index, enable, selectors in switches:
        for name, to_selector in selectors.items():
            if name in env:
                selector = to_selector(env[name])
                if selector is not None:
                    out["modifiers"][index][1] = selector
                    from_env.append(index)
    for name, where, key, field, kind, mapping in table:
        if name not in env:
            continue
        try:
            value = parse_env_value(env[name], kind, mapping)
        except ValueError:
            sys.exit(f"error: environment {name}={env[name]!r}: not a valid {kind} for {where}.{field}")
        if where == "slot":
            out["slots"][key][1][field] = value
        elif where == "modifier":
            out["modifiers"][key][2][field] = value
        else:
            out[where][field] = value
    num_layers = out["model"]["num_layers"]
    for index in from_env:  # the references slice their layer list: XSA_LAST_N=11 of 5 layers is every layer
        words = out["modifiers"][index][1].split() if isinstance(out["modifiers"][index][1], str) else []
        if len(words) == 2 and words[0] in ("last", "first") and words[1].isdigit() and int(words[1]) > num_layers:
            out["modifiers"][index][1] = f"{words[0]} {num_layers}"
    dropped = {index for index, enable, _ in switches if enable and enable in env and not int(env[enable])}
    out["modifiers"] = [m for i, m in enumerate(out["modifiers"]) if i not in dropped]
    return out


class RunFiles:
    """Where an exported run writes: ``logs/<run_id>.txt`` and the artifact in the working directory, as the
    reference scripts do; rank 0 prints every line."""

    def __init__(self, run_id: str, master: bool) -> None:
        self.run_id, self.master = run_id, master
        self.logfile = Path("logs") / f"{run_id}.txt"
        if master:
            self.logfile.parent.mkdir(parents=True, exist_ok=True)

    def log(self, message: str, console: bool = True) -> None:
        if not self.master:
            return
        if console:
            print(message, flush=True)
        with self.logfile.open("a", encoding="utf-8") as f:
            f.write(message + "\n")

    def write_bytes(self, name: str, blob: bytes) -> Path:
        path = Path(name)
        if self.master:
            path.write_bytes(blob)
        return path


def main(data: dict[str, Any], builds: dict[tuple[str, str], Callable[..., Any]], table: list[list[Any]], switches: list[list[Any]]) -> None:
    stack = Stack(apply_environment(data, table, switches, dict(os.environ)))
    registry = Registry(builds)
    runtime = setup_runtime(stack)
    files = RunFiles(os.environ.get("RUN_ID") or stack.run.run_id or str(uuid.uuid4()), runtime.is_master)
    try:
        data_files = load_data_files(stack, runtime.device, registry, stack.data.path, stack.data.tokenizer)
        trainer = Trainer(stack, registry, runtime, data_files, files.log, lambda **record: None)
        trainer.log_header()
        trainer.warmup(stack.run.warmup_steps)
        trainer.train()
        code = len(Path(sys.argv[0]).read_bytes()) if sys.argv and Path(sys.argv[0]).is_file() else 0
        _, results = export_and_evaluate(trainer, files, code)
        for r in results:
            check = trainer.evaluator.compliance_for(r.name)
            files.log(f"compliance:{r.name} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    finally:
        runtime.shutdown()
    files.log(f"done: {time.strftime('%Y-%m-%d %H:%M:%S')}", console=False)
