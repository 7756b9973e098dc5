"""The contract every technique meets, built-in or installed: ``check_technique_contract(registry, registration)``.

``tests/test_contract.py`` runs it over every installed technique; a plugin package runs it over its own
(``registrations_of``). A failure names the technique, the check and the fix.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Callable
from typing import Any

from .model import build_slot, cpu_runtime, tiny_batch, tiny_eval_env, tiny_model
from .stacks import TINY_STACK, tiny_stack

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MODULE_SLOTS = ("embedding", "attention", "mlp", "residual", "topology", "head", "loss", "init", "modifier")
"""Slots whose techniques end up inside the model (and so inside the compiled graph)."""
LOOP_SLOTS = ("schedule", "averaging", "quantizer", "compressor", "evaluator")
"""Slots whose built objects take part in the training loop and the export."""


class ContractError(AssertionError):
    """A technique broke its contract; the message names the technique, the check and the fix."""


def check_technique_contract(registry: Any, registration: Any, *overrides: str, seed: int = 0) -> None:
    """Run every contract check on one registered technique; raises ``ContractError`` on the first failure.

    Checks, in order: metadata (name, summary, typed params with help, frozen), the example stanza (it parses
    and selects the technique), config round trip (TOML → attrs → TOML → attrs), build on the meta device,
    the slot's protocol (``pgolf_core.contracts``), CPU forward/backward, ``torch.compile(fullgraph=True, backend="eager")`` (module techniques marked
    ``compile_safe``), same output for the same seed, state_dict round trips (model and every built object
    that has one), and a short training loop through every slot (loop events, export, quantize, compress,
    round trip, evaluate); loaders and tokenizers also run on the bundled sample. ``overrides`` are ``--set``
    expressions for the tiny stack.
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
    _check_slot_contract(stack, registry, technique, fail)
    _check_model(stack, registry, technique, seed, fail)
    _check_loop(stack, registry, seed, fail)
    if technique.slot == "loader":
        _check_loader(stack, registry, fail)
    if technique.slot == "tokenizer":
        _check_tokenizer(stack, registry, fail)


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


def _check_slot_contract(stack: Any, registry: Any, technique: Any, fail: Callable[[str, str], ContractError]) -> None:
    """What the technique builds meets its slot's protocol (a modifier's object: ``transform``)."""
    import torch

    from pgolf_core.contracts import SLOT_CONTRACTS, Modifier
    from pgolf_core.model.gpt import build_model

    contract = SLOT_CONTRACTS[technique.slot]
    if technique.slot in ("attention", "mlp", "residual", "embedding", "topology", "head", "loss"):
        with torch.device("meta"):
            model, _ = build_model(stack, registry)
        built = {
            "attention": lambda: model.blocks[0].attn, "mlp": lambda: model.blocks[0].mlp, "residual": lambda: model.blocks[0],
            "embedding": lambda: model.embedding, "topology": lambda: model.topology, "head": lambda: model.head, "loss": lambda: model.loss,
        }[technique.slot]()
    elif technique.slot == "modifier":
        from pgolf_core.model.spec import BuildContext

        choice = next(m for m in stack.modifiers if m.technique == technique.name)
        built = technique.build(choice.params, BuildContext(stack.model, stack.run, stack.data))
        if not isinstance(built, Modifier):
            raise fail("slot contract", f"build() returned {type(built).__name__}, which has no transform(spec, layers, name)")
        return
    else:
        built = build_slot(stack, registry, technique.slot)
    if not contract.accepts(built):
        raise fail("slot contract", f"build() returned {type(built).__name__}, which does not meet the {technique.slot} contract: {contract.returns}")

def _build_seeded(stack: Any, registry: Any, seed: int) -> tuple[Any, list[Any]]:
    model, modifiers, _ = tiny_model(registry, stack=stack, seed=seed)
    return model, modifiers


def _check_model(stack: Any, registry: Any, technique: Any, seed: int, fail: Callable[[str, str], ContractError]) -> None:
    import torch

    from pgolf_core.model.roles import is_frozen

    x, y = tiny_batch(stack, seed)
    model, modifiers = _build_seeded(stack, registry, seed)
    model.train()
    loss = model(x, y)
    if loss.ndim != 0 or not bool(torch.isfinite(loss)):
        raise fail("forward/backward", f"the loss must be a finite scalar, got {loss!r}")
    loss.backward()
    # Frozen parameters (``pgolf_core.model.roles``, e.g. recurrence blend scales before their switch) are in no
    # optimizer and kept out of DDP, so they may sit out of the loss.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and not is_frozen(p)]
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
    """A built object with checkpointable state (``Stateful``) must restore it into a freshly built twin."""
    from pgolf_core.contracts import Stateful

    has_save, has_load = callable(getattr(obj, "state_dict", None)), callable(getattr(obj, "load_state_dict", None))
    if has_save != has_load:
        raise fail("state_dict", f"{what} ({type(obj).__name__}) defines only one of state_dict/load_state_dict")
    if not isinstance(obj, Stateful):
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


def _check_loop(stack: Any, registry: Any, seed: int, fail: Callable[[str, str], ContractError]) -> None:
    """A few real steps through every slot, with loop events, then the export pipeline and the evaluator."""
    import torch

    from pgolf_core.contracts import FinalResult
    from pgolf_core.evaluate import eval_val
    from pgolf_core.model.roles import parameter_roles
    from pgolf_core.train import Events, TrainState

    runtime = cpu_runtime()
    model, modifiers = _build_seeded(stack, registry, seed)
    built: dict[str, Any] = {}
    try:
        optimizers = build_slot(stack, registry, "optimizer")(model, runtime)
        for slot in LOOP_SLOTS:
            built[slot] = build_slot(stack, registry, slot)
    except Exception as exc:
        raise fail("loop", f"building the optimizer/schedule/averaging/quantizer/compressor/evaluator failed: {_text(exc)}") from None
    lines: list[str] = []
    state = TrainState(stack=stack, runtime=runtime, model=model, optimizers=optimizers, log=lambda msg, console=True: lines.append(msg))
    state.iterations = stack.run.iterations
    events = Events([built["schedule"], built["averaging"], built["quantizer"], built["compressor"], built["evaluator"], *modifiers], registry.hooks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = tiny_batch(stack, seed)
    env = tiny_eval_env(stack, seed, built["evaluator"].eval_seq_len, model)
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
    fresh_opt = build_slot(stack, registry, "optimizer")(fresh_model, runtime)
    _object_round_trip(optimizers, fresh_opt, "optimizer", fail)
    for slot in LOOP_SLOTS:
        _object_round_trip(built[slot], build_slot(stack, registry, slot), slot, fail)
    for index, (obj, fresh) in enumerate(zip(modifiers, fresh_modifiers)):
        _object_round_trip(obj, fresh, f"modifier[{index}] after training", fail)

    quantizer, compressor = built["quantizer"], built["compressor"]
    try:
        weights = built["averaging"].export_weights(model)
        expected = model.state_dict()
        if set(weights) != set(expected) or any(tuple(weights[k].shape) != tuple(expected[k].shape) for k in expected):
            raise fail("export", "averaging.export_weights must return a state_dict with the model's keys and shapes")
        obj, _stats = quantizer.quantize(weights, parameter_roles(model))
        blob = compressor.compress(obj)
        restored = quantizer.dequantize(compressor.decompress(blob))
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
    if not results or any(not isinstance(r, FinalResult) or not math.isfinite(r.val_loss) or not math.isfinite(r.val_bpb) for r in results):
        raise fail("evaluate", f"evaluate() must return [FinalResult(name, val_loss, val_bpb, eval_ms, note), ...] with finite numbers, got {results!r}")
    reported = built["evaluator"].reported_lines(quantizer.label, compressor.label)
    if [r.name for r in results] != list(reported):
        raise fail("evaluate", f"evaluate() reported {[r.name for r in results]} but reported_lines() names {list(reported)}")
    for name in reported:
        check = built["evaluator"].compliance_for(name)
        if check.ok not in (True, False) or not check.reason:
            raise fail("evaluate", f"compliance_for({name!r}) must give a verdict and a reason, got {check!r}")


def _check_loader(stack: Any, registry: Any, fail: Callable[[str, str], ContractError]) -> None:
    """A loader on the bundled sample: batches of the asked shape, and a saved state that replays the stream."""
    import torch

    from pgolf_core.contracts import Batch
    from pgolf_core.data import TRAIN_PATTERN, shard_files
    from pgolf_core.sample import build_sample

    files = shard_files(build_sample("sample:sp1024"), TRAIN_PATTERN, "training")
    make = build_slot(stack, registry, "loader")
    loader = make(files, 0, 1, torch.device("cpu"), stack.model.vocab_size)
    seq = stack.data.train_seq_len
    first = loader.next_batch(4 * seq, seq, 1)
    if not isinstance(first, Batch) or first.inputs.shape != (4, seq) or first.targets.shape != (4, seq):
        raise fail("loader", f"next_batch(4*seq_len, seq_len, 1) must return a Batch of (4, {seq}) inputs and targets, got {first!r}")
    state = copy.deepcopy(loader.state_dict())
    expected = loader.next_batch(4 * seq, seq, 1)
    again = make(files, 0, 1, torch.device("cpu"), stack.model.vocab_size)
    again.load_state_dict(state)
    got = again.next_batch(4 * seq, seq, 1)
    if not (torch.equal(got.inputs, expected.inputs) and torch.equal(got.targets, expected.targets)):
        raise fail("loader", "a loader restored from state_dict() does not continue the stream where it was saved")


def _check_tokenizer(stack: Any, registry: Any, fail: Callable[[str, str], ContractError]) -> None:
    """A tokenizer on the bundled sample: its byte counts are positive integers for ordinary tokens."""
    import torch

    from pgolf_core.data import VAL_PATTERN, load_validation_tokens, shard_files
    from pgolf_core.sample import build_sample, tokenizer_path

    tokenizer = build_slot(stack, registry, "tokenizer")
    tokenizer.load(tokenizer_path("sample:sp1024"), stack.model.vocab_size)
    tokens = load_validation_tokens(shard_files(build_sample("sample:sp1024"), VAL_PATTERN, "validation"), stack.data.train_seq_len)
    tokenizer.check_shards(tokens, "sample:sp1024")
    ids = tokens.long()
    counts = tokenizer.byte_counts(tokens, torch.device("cpu")).count(ids[:-1], ids[1:], 1)
    if counts.shape != tokens[1:].shape or counts.is_floating_point() or int(counts.sum()) <= 0 or int(counts.min()) < 0:
        raise fail("tokenizer", "byte_counts(...).count(prev, tgt, first_pos) must give a non-negative integer count per target")
