"""Catalogues and tiny stacks for tests: the built-in techniques plus yours, never autoloaded ones."""

from __future__ import annotations

import sys
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

TINY_STACK = """\
# The baseline techniques at toy size on the bundled sample data: what the contract builds around a technique.
schema_version = 1

[meta]
name = "tiny"

[run]
seed = 1337
iterations = 4
warmup_steps = 0
max_wallclock_seconds = 0.0
val_loss_every = 0
train_log_every = 1
grad_accum_base = 1
device = "cpu"
compile = "off"

[data]
path = "sample:sp1024"
tokenizer = "sample:sp1024"
train_batch_tokens = 128
train_seq_len = 32
val_batch_size = 256

[model]
vocab_size = 1024
num_layers = 4
model_dim = 64
num_heads = 4
num_kv_heads = 2

[tokenizer]
use = "sentencepiece"

[loader]
use = "sequential"

[embedding]
use = "token"

[attention]
use = "gqa"

[mlp]
use = "relu2"

[residual]
use = "resid_mix"

[topology]
use = "unet"

[head]
use = "softcap"

[loss]
use = "cross_entropy"

[init]
use = "baseline"

[optimizer]
use = "muon"

[schedule]
use = "linear_warmdown"
warmdown_iters = 2

[averaging]
use = "none"

[quantizer]
use = "int8_rowwise"

[compressor]
use = "zlib"

[evaluator]
use = "full_val"
"""
"""Every slot filled with the official baseline's technique; sizes small enough for a CPU test."""


def fresh_registry(*plugins: Any, distribution: str | None = None) -> Any:
    """A new catalogue: pgolf's built-in techniques plus ``plugins`` (modules or objects), no autoload."""
    from pgolf_core.registry import Registry

    registry = Registry()
    registry.load_entry_points(allow=set())  # only the pgolf distribution's own entry points
    for plugin in plugins:
        name = getattr(plugin, "__name__", type(plugin).__name__)
        registry.add_plugin(plugin, distribution=distribution or f"test:{name}", version="")
    return registry


def installed_registry() -> Any:
    """A new catalogue with every installed plugin, honouring the PGOLF_* controls, as ``pgolf run`` loads it."""
    import os

    from pgolf_core.registry import Registry, _env_set

    registry = Registry()
    if os.environ.get("PGOLF_DISABLE_PLUGIN_AUTOLOAD") == "1":
        registry.load_entry_points(allow=set())
    else:
        registry.load_entry_points(allow=_env_set("PGOLF_LOAD_PLUGINS"), block=_env_set("PGOLF_BLOCK_PLUGINS"))
    return registry


def tiny_stack(registry: Any, *overrides: str, extra: str | dict[str, Any] | None = None, base: str | Path | None = None) -> Any:
    """A resolved ``Stack``: ``base`` (default ``TINY_STACK``), then ``extra`` merged over it, then ``--set`` overrides.

    ``extra`` is TOML text or a dict of tables, merged like ``extends`` (a slot table naming another technique
    replaces the base's table; arrays such as ``[[modifier]]`` replace). ``base`` is a stack file path.
    """
    from pgolf_core.config.load import deep_merge, load_stack

    if isinstance(extra, str):
        extra = tomllib.loads(extra)
    if base is not None and not extra:
        return load_stack(base, registry, overrides=list(overrides))
    import tomli_w

    data = tomllib.loads(TINY_STACK) if base is None else {"schema_version": 1, "extends": str(Path(base).resolve())}
    merged = deep_merge(data, extra or {})
    with tempfile.TemporaryDirectory(prefix="pgolf-tiny-") as tmp:
        path = Path(tmp) / "tiny.toml"
        path.write_text(tomli_w.dumps(merged), encoding="utf-8")
        return load_stack(path, registry, overrides=list(overrides))


def registrations_of(registry: Any, plugin: types.ModuleType | Any) -> Iterable[Any]:
    """The registrations a plugin module contributed (to parametrize a contract test over them)."""
    name = getattr(plugin, "__name__", type(plugin).__name__)
    return [r for r in registry.all() if r.module == name]
