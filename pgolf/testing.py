"""Test helpers for technique authors: a clean catalogue, a tiny stack, and the contract every technique meets.

Installed as a pytest plugin (entry point ``pytest11``), so a plugin package's tests get the fixtures
``pgolf_registry`` and ``pgolf_tiny_stack`` without a conftest. The same things are plain functions for use
outside fixtures::

    from pgolf.testing import check_technique_contract, fresh_registry
    import my_package.my_technique as plugin

    def test_contract():
        registry = fresh_registry(plugin)
        check_technique_contract(registry, registry.get("mlp", "my_mlp"))

``fresh_registry`` never autoloads: other installed plugins cannot change what a test sees (pytest and llm
skip autoload under test for the same reason). The contract is what ``tests/test_contract.py`` runs over
every installed technique; a technique that fails it, or has no ``example`` stanza, fails pgolf's suite.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import tempfile
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "TINY_STACK",
    "ContractError",
    "check_technique_contract",
    "fresh_registry",
    "installed_registry",
    "registrations_of",
    "tiny_stack",
]

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

MODULE_SLOTS = ("embedding", "attention", "mlp", "residual", "topology", "head", "init", "modifier")
"""Slots whose techniques end up inside the model (and so inside the compiled graph)."""


class ContractError(AssertionError):
    """A technique broke its contract; the message names the technique, the check and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Catalogues and stacks


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


# ---------------------------------------------------------------------------------------------------------
# The contract


def check_technique_contract(registry: Any, registration: Any, *overrides: str, seed: int = 0) -> None:
    """Run every contract check on one registered technique; raises ``ContractError`` on the first failure.

    Checks, in order: metadata (name, summary, typed params with help, frozen), the example stanza (it parses
    and selects the technique), config round trip (TOML → attrs → TOML → attrs), build on the meta device,
    CPU forward/backward, ``torch.compile(fullgraph=True, backend="eager")`` (module techniques marked
    ``compile_safe``), same output for the same seed, state_dict round trips (model and every built object
    that has one), and a short training loop through every slot (loop events, export, quantize, compress,
    round trip, evaluate). ``overrides`` are ``--set`` expressions for the tiny stack.
    """
    import torch

    if registration is None:
        raise ContractError("no registration given (registry.get(slot, name) returned None: is the plugin registered?)")
    # One thread: tiny tensors gain nothing from more, and busy-waiting OpenMP workers on a loaded CI machine
    # turn a second of work into many.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_all(registry, registration, overrides, seed)
    finally:
        torch.set_num_threads(threads)


def _check_all(registry: Any, registration: Any, overrides: tuple[str, ...], seed: int) -> None:
    technique = registration.technique
    origin = f"{registration.distribution} {registration.version}".strip()
    where = f"technique '{technique.name}' (slot {technique.slot}; {origin}; {registration.module})"

    def fail(check: str, message: str) -> ContractError:
        return ContractError(f"{where}: {check}: {message}")

    _check_metadata(technique, fail)
    example = _check_example(technique, fail)
    try:
        stack = tiny_stack(registry, *_layers_for(example), *overrides, extra=example)
    except Exception as exc:
        raise fail("example", f"the example does not load into a tiny stack: {_text(exc)}") from None
    _check_round_trip(stack, registry, technique, fail)
    _check_meta_build(stack, registry, fail)
    _check_model(stack, registry, technique, seed, fail)
    _check_loop(stack, registry, seed, fail)


def _text(exc: BaseException) -> str:
    problems = getattr(exc, "problems", None)
    return "; ".join(problems) if problems else f"{type(exc).__name__}: {exc}"


def _check_metadata(technique: Any, fail: Callable[[str, str], ContractError]) -> None:
    import attrs

    if not re.fullmatch(r"[a-z][a-z0-9_]*", technique.name):
        raise fail("metadata", "names are snake_case ([a-z][a-z0-9_]*), as stack files refer to them")
    if not technique.summary.strip():
        raise fail("metadata", "summary is empty; one line on what the technique does and where it comes from")
    params = technique.params
    if not _is_frozen(params):
        raise fail("metadata", f"params class {params.__name__} must be frozen (@attrs.define(frozen=True, kw_only=True))")
    for field in attrs.fields(params):
        if field.default is attrs.NOTHING:
            raise fail("metadata", f"parameter '{field.name}' has no default; every stack key needs one")
        if not field.metadata.get("help"):
            raise fail("metadata", f"parameter '{field.name}' has no help text; declare it with pgolf_core.config.fields.param(..., help=...)")
    if not technique.example.strip():
        raise fail("example", "the technique has no example stanza; pass example='[<slot>]\\nuse = \"<name>\"\\n...' to Technique")


def _is_frozen(cls: type) -> bool:
    import attrs

    try:
        instance = cls()
    except Exception:
        return True  # required fields are reported by the next check
    fields = attrs.fields(cls)
    if not fields:
        return cls.__setattr__ is not object.__setattr__
    try:
        setattr(instance, fields[0].name, getattr(instance, fields[0].name))
    except attrs.exceptions.FrozenInstanceError:
        return True
    return False


def _check_example(technique: Any, fail: Callable[[str, str], ContractError]) -> dict[str, Any]:
    try:
        example = tomllib.loads(technique.example)
    except tomllib.TOMLDecodeError as exc:
        raise fail("example", f"the example stanza is not valid TOML: {exc}") from None
    if technique.slot == "modifier":
        entries = example.get("modifier")
        if not isinstance(entries, list) or not any(isinstance(e, dict) and e.get("use") == technique.name for e in entries):
            raise fail("example", f"the example must contain [[modifier]] with use = \"{technique.name}\"")
    else:
        table = example.get(technique.slot)
        if not isinstance(table, dict) or table.get("use") != technique.name:
            raise fail("example", f"the example must contain [{technique.slot}] with use = \"{technique.name}\"")
    return example


def _layers_for(example: dict[str, Any]) -> list[str]:
    """Deepen the tiny model when an example names layers it does not have (``layers = [9, 10]`` or ``"7:"`` as in
    an 11-layer record, ``"last 5"``): selectors that name missing layers are errors."""
    tiny = tomllib.loads(TINY_STACK)["model"]["num_layers"]
    wanted = []
    for m in example.get("modifier", []):
        layers = m.get("layers") if isinstance(m, dict) else None
        if isinstance(layers, list):
            wanted += [i + 1 if i >= 0 else -i for i in layers if isinstance(i, int) and not isinstance(i, bool)]
        elif isinstance(layers, str):
            words, (lo, colon, hi) = layers.split(), layers.partition(":")
            if len(words) == 2 and words[0] in ("last", "first") and words[1].isdigit():
                wanted.append(int(words[1]))
            elif colon:  # "7:" needs layer 7 to exist (8 layers); "-4:" and ":3" need 4 and 3 layers
                start, stop = lo.strip(), hi.strip()
                if start.lstrip("-").isdigit():
                    wanted.append(int(start) + 1 if int(start) >= 0 else -int(start))
                if stop.lstrip("-").isdigit():
                    wanted.append(abs(int(stop)))
    deepest = max(wanted, default=0)
    return [f"model.num_layers={deepest}"] if deepest > tiny else []


def _choices(stack: Any, technique: Any) -> list[Any]:
    if technique.slot == "modifier":
        return [m for m in stack.modifiers if m.technique == technique.name]
    return [stack.slots[technique.slot]]


def _check_round_trip(stack: Any, registry: Any, technique: Any, fail: Callable[[str, str], ContractError]) -> None:
    import tomli_w

    from pgolf_core.config.convert import structure_table
    from pgolf_core.config.dump import stack_to_dict

    text = tomli_w.dumps(stack_to_dict(stack))
    data = tomllib.loads(text)
    tables = data.get("modifier", []) if technique.slot == "modifier" else [data[technique.slot]]
    tables = [t for t in tables if t.get("use") == technique.name]
    for choice, table in zip(_choices(stack, technique), tables, strict=True):
        table = {k: v for k, v in table.items() if k not in ("use", "layers")}
        again, problems = structure_table(table, technique.params, technique.slot)
        if problems:
            raise fail("config round trip", f"the dumped TOML does not load back: {problems[0][0]}: {problems[0][1]}")
        if again != choice.params:
            raise fail("config round trip", f"TOML -> attrs -> TOML changed the parameters: {choice.params!r} became {again!r}")
        if tomli_w.dumps(_plain(again)) != tomli_w.dumps(_plain(choice.params)):
            raise fail("config round trip", "the parameters dump to different TOML after a round trip")


def _plain(params: Any) -> dict[str, Any]:
    import attrs

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(params, recurse=False).items() if v is not None}


def _check_meta_build(stack: Any, registry: Any, fail: Callable[[str, str], ContractError]) -> None:
    import torch

    from pgolf_core.model.gpt import build_model, count_parameters

    try:
        with torch.device("meta"):
            model, _ = build_model(stack, registry)
    except Exception as exc:
        raise fail("meta build", f"building the model on the meta device failed: {_text(exc)}") from None
    off_meta = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    if off_meta:
        raise fail("meta build", f"parameters created off the default device: {', '.join(off_meta[:3])}; create tensors without device=")
    if count_parameters(model) <= 0:
        raise fail("meta build", "the model has no parameters")


def _batch(stack: Any, seed: int) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    vocab, seq = stack.model.vocab_size, stack.data.train_seq_len
    x = torch.randint(0, vocab, (2, seq), generator=gen)
    y = torch.randint(0, vocab, (2, seq), generator=gen)
    return x, y


def _build_seeded(stack: Any, registry: Any, seed: int) -> tuple[Any, list[Any]]:
    import torch

    from pgolf_core.model.gpt import build_model

    torch.manual_seed(seed)
    return build_model(stack, registry)


def _check_model(stack: Any, registry: Any, technique: Any, seed: int, fail: Callable[[str, str], ContractError]) -> None:
    import torch

    x, y = _batch(stack, seed)
    model, modifiers = _build_seeded(stack, registry, seed)
    model.train()
    loss = model(x, y)
    if loss.ndim != 0 or not bool(torch.isfinite(loss)):
        raise fail("forward/backward", f"the loss must be a finite scalar, got {loss!r}")
    loss.backward()
    # Parameters marked untrained (``_pgolf_untrained``, e.g. recurrence blend scales before their switch) are in
    # no optimizer and kept out of DDP, so they may sit out of the loss.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and not getattr(p, "_pgolf_untrained", False)]
    if missing:
        raise fail(
            "forward/backward",
            f"parameters without a gradient: {', '.join(missing[:4])}; every parameter must take part in the loss "
            "(DDP refuses unused parameters)",
        )
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if bad:
        raise fail("forward/backward", f"non-finite gradients in {', '.join(bad[:4])}")

    if technique.slot in MODULE_SLOTS and technique.compile_safe:
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
            compiled_loss = compiled(x, y)
        except Exception as exc:
            raise fail(
                "compile",
                f"torch.compile(fullgraph=True) failed: {_text(exc).splitlines()[0]}; keep Python-side switches out of "
                "forward (use buffers), wrap custom kernels with torch.library, or register with compile_safe=False",
            ) from None
        finally:
            torch._dynamo.reset()
        if not torch.allclose(compiled_loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6):
            raise fail("compile", f"compiled loss {compiled_loss.item():.6f} differs from eager {loss.item():.6f}")

    again, _ = _build_seeded(stack, registry, seed)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        if name != name_b or not torch.equal(a, b):
            raise fail("same seed", f"two builds with seed {seed} differ at '{name}'; draw random numbers only from torch's global RNG")
    with torch.no_grad():
        if not torch.equal(again(x, y), loss.detach()):
            raise fail("same seed", "two builds with the same seed give different losses on the same batch")

    other, _ = _build_seeded(stack, registry, seed + 7)
    try:
        other.load_state_dict(model.state_dict(), strict=True)
    except Exception as exc:
        raise fail("state_dict", f"a fresh build does not load the model's state_dict: {_text(exc).splitlines()[0]}") from None
    with torch.no_grad():
        if not torch.equal(other(x, y), loss.detach()):
            raise fail("state_dict", "a fresh build loaded with the state_dict computes a different loss; keep all state in parameters/buffers")
    _, fresh_modifiers = _build_seeded(stack, registry, seed)
    for index, (obj, fresh) in enumerate(zip(modifiers, fresh_modifiers)):
        _object_round_trip(obj, fresh, f"modifier[{index}]", fail)


def _object_round_trip(obj: Any, fresh: Any, what: str, fail: Callable[[str, str], ContractError]) -> None:
    """A built object with checkpointable state must restore it into a freshly built twin."""
    has_save, has_load = callable(getattr(obj, "state_dict", None)), callable(getattr(obj, "load_state_dict", None))
    if has_save != has_load:
        raise fail("state_dict", f"{what} ({type(obj).__name__}) defines only one of state_dict/load_state_dict")
    if not has_save:
        return
    state = obj.state_dict()
    try:
        fresh.load_state_dict(copy.deepcopy(state))
    except Exception as exc:
        raise fail("state_dict", f"{what}: a fresh build does not load the saved state: {_text(exc).splitlines()[0]}") from None
    difference = _first_difference(state, fresh.state_dict())
    if difference:
        raise fail("state_dict", f"{what}: state after load_state_dict differs at {difference}")


def _first_difference(a: Any, b: Any, path: str = "state") -> str | None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        return None if same else path
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path} (keys {sorted(map(str, set(a) ^ set(b)))[:3]})"
        for key in a:
            found = _first_difference(a[key], b[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else path


def _build_slot(stack: Any, registry: Any, slot: str) -> Any:
    from pgolf_core.model.spec import BuildContext

    reg = registry.get(slot, stack.technique(slot))
    return reg.technique.build(stack.params(slot), BuildContext(stack.model, stack.run, stack.data))


def _cpu_runtime() -> Any:
    import torch

    from pgolf_core.runtime import Runtime

    return Runtime(
        rank=0, world_size=1, local_rank=0, distributed=False, device=torch.device("cpu"), bf16=False, compile=False, grad_accum_steps=1
    )


def _eval_env(stack: Any, seed: int) -> Any:
    import torch

    from pgolf_core.evaluate import EvalEnv, ValData

    vocab, seq = stack.model.vocab_size, stack.data.train_seq_len
    # Evaluators may score longer windows than training (``eval_seq_len``, as the loop reads it): give them room.
    longest = max(seq, getattr(stack.params("evaluator"), "eval_seq_len", 0) or 0)
    gen = torch.Generator().manual_seed(seed + 2)
    tokens = torch.randint(0, vocab, (longest + 1,), generator=gen)
    val = ValData(
        tokens,
        torch.randint(1, 4, (vocab,), generator=gen).to(torch.int16),
        torch.zeros(vocab, dtype=torch.bool),
        torch.zeros(vocab, dtype=torch.bool),
    )
    env = EvalEnv(val, seq, max(stack.data.val_batch_size, longest), 1, 0, 1, torch.device("cpu"))
    return env


def _with_model(env: Any, model: Any) -> Any:
    """The eval environment as the loop passes it: with the uncompiled model for logits-level evaluators."""
    import attrs

    return attrs.evolve(env, base_model=model) if "base_model" in attrs.fields_dict(type(env)) else env


def _check_loop(stack: Any, registry: Any, seed: int, fail: Callable[[str, str], ContractError]) -> None:
    """A few real steps through every slot, with loop events, then the export pipeline and the evaluator."""
    import torch

    from pgolf_core.artifact import deserialize, serialize
    from pgolf_core.evaluate import eval_val
    from pgolf_core.train import Events, TrainState

    runtime = _cpu_runtime()
    model, modifiers = _build_seeded(stack, registry, seed)
    built: dict[str, Any] = {}
    try:
        optimizers = _build_slot(stack, registry, "optimizer")(model, runtime)
        for slot in ("schedule", "averaging", "quantizer", "compressor", "evaluator"):
            built[slot] = _build_slot(stack, registry, slot)
    except Exception as exc:
        raise fail("loop", f"building the optimizer/schedule/averaging/quantizer/compressor/evaluator failed: {_text(exc)}") from None
    lines: list[str] = []
    state = TrainState(stack=stack, runtime=runtime, model=model, optimizers=optimizers, log=lambda msg, console=True: lines.append(msg))
    state.iterations = stack.run.iterations
    events = Events([built["schedule"], built["averaging"], built["quantizer"], built["compressor"], built["evaluator"], *modifiers], registry)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batch(stack, seed)
    env = _with_model(_eval_env(stack, seed), model)
    try:
        events.fire("on_train_start", state)
        for step in range(stack.run.iterations):
            scale = built["schedule"].lr_mul(step, 10.0 * step)
            if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
                raise fail("loop", f"schedule lr_mul({step}, ...) returned {scale!r}; expected a finite float >= 0")
            state.step, state.lr_scale = step, scale
            if "on_step_start" in Events.NAMES:
                events.fire("on_step_start", state)
            optimizers.zero_grad()
            loss = model(x, y)
            loss.backward()
            optimizers.before_step(step)
            optimizers.set_lr_scale(scale)
            optimizers.step(model)
            optimizers.zero_grad()
            state.step, state.lr_scale, state.train_time_ms = step + 1, scale, 10.0 * (step + 1)
            state.train_loss = float(loss.detach())
            events.fire("after_optimizer_step", state)
            events.fire("on_step_end", state)
            if step == 1:
                events.fire("on_eval_start", state)
                state.last_val = eval_val(model, env)
                events.fire("on_eval_end", state)
        events.fire("on_train_end", state)
    except ContractError:
        raise
    except Exception as exc:
        raise fail("loop", f"training steps with loop events failed: {_text(exc)}") from None
    if all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters()):
        raise fail("loop", "no parameter changed after the optimizer steps")

    _, fresh_modifiers = _build_seeded(stack, registry, seed)
    fresh_model, _ = _build_seeded(stack, registry, seed)
    fresh_opt = _build_slot(stack, registry, "optimizer")(fresh_model, runtime)
    _object_round_trip(optimizers, fresh_opt, "optimizer", fail)
    for slot in ("schedule", "averaging", "quantizer", "compressor", "evaluator"):
        _object_round_trip(built[slot], _build_slot(stack, registry, slot), slot, fail)
    for index, (obj, fresh) in enumerate(zip(modifiers, fresh_modifiers)):
        _object_round_trip(obj, fresh, f"modifier[{index}] after training", fail)

    quantizer, compressor = built["quantizer"], built["compressor"]
    try:
        weights = built["averaging"].export_weights(model)
        expected = model.state_dict()
        if set(weights) != set(expected) or any(tuple(weights[k].shape) != tuple(expected[k].shape) for k in expected):
            raise fail("export", "averaging.export_weights must return a state_dict with the model's keys and shapes")
        obj, _stats = quantizer.quantize(weights)
        blob = compressor.compress(serialize(obj))
        restored = quantizer.dequantize(deserialize(compressor.decompress(blob)))
    except ContractError:
        raise
    except Exception as exc:
        raise fail("export", f"export -> quantize -> compress -> decompress -> dequantize failed: {_text(exc)}") from None
    if not isinstance(blob, bytes) or not str(getattr(quantizer, "label", "")) or not str(getattr(compressor, "label", "")):
        raise fail("export", "compressors return bytes; quantizers and compressors have a non-empty 'label'")
    try:
        model.load_state_dict(restored, strict=True)
    except Exception as exc:
        raise fail("export", f"the round-tripped weights do not load into the model: {_text(exc).splitlines()[0]}") from None
    try:
        results = built["evaluator"].evaluate(model, env, quantizer.label, compressor.label)
    except Exception as exc:
        raise fail("evaluate", f"evaluate() failed: {_text(exc)}") from None
    if not results or any(len(r) < 3 or not isinstance(r[0], str) or not all(math.isfinite(float(v)) for v in r[1:3]) for r in results):
        raise fail("evaluate", f"evaluate() must return [(line name, val_loss, val_bpb, ...), ...] with finite numbers, got {results!r}")


# ---------------------------------------------------------------------------------------------------------
# pytest fixtures (loaded through the pytest11 entry point)


@pytest.fixture
def pgolf_registry() -> Any:
    """A catalogue with only pgolf's built-ins; add your plugin with ``pgolf_registry.add_plugin(module, distribution=...)``."""
    return fresh_registry()


@pytest.fixture
def pgolf_tiny_stack(pgolf_registry: Any) -> Callable[..., Any]:
    """``pgolf_tiny_stack(*overrides, extra=..., registry=...)``: a tiny resolved stack (see ``tiny_stack``)."""

    def make(*overrides: str, extra: str | dict[str, Any] | None = None, registry: Any = None) -> Any:
        return tiny_stack(registry or pgolf_registry, *overrides, extra=extra)

    return make


def registrations_of(registry: Any, plugin: types.ModuleType | Any) -> Iterable[Any]:
    """The registrations a plugin module contributed (to parametrize a contract test over them)."""
    name = getattr(plugin, "__name__", type(plugin).__name__)
    return [r for r in registry.all() if r.module == name]
