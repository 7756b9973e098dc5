"""The contracts between pgolf and its techniques, in one place: what each slot's ``build`` returns, and the
optional capabilities the pipeline looks for.

Every slot technique registers ``build(params, ctx, **kw)`` (``ctx`` is a ``pgolf_core.model.spec.
BuildContext``); what it returns must satisfy the slot's protocol below. Capabilities are separate
protocols: an object has one when it defines the method, and the pipeline checks with ``isinstance``
(all protocols here are ``runtime_checkable``), never by probing for private names.

``SLOT_CONTRACTS`` lists the slots in pipeline order with the build signature and a one-line description;
``pgolf list``, ``pgolf_core.hookspecs.SLOTS`` and the reference page ``docs/hooks.md`` (checked by a test)
come from it. ``CAPABILITIES`` does the same for the capability protocols.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import dataclasses
from torch import Tensor, nn


# -- records the pipeline passes around -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Compliance:
    """One rule check of a technique: ``ok`` and why, in words a reviewer can check."""

    what: str
    ok: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class FinalResult:
    """One final evaluation line: ``{name} val_loss:… val_bpb:… {note} eval_time:…ms`` in the log."""

    name: str
    val_loss: float
    val_bpb: float
    eval_ms: float
    note: str = ""


class Batch(NamedTuple):
    """One micro-batch from a loader: inputs and targets (B, T) and per-batch extras for the model (document
    boundaries, ...), which reach every block and attention as ``aux`` (empty for plain token streams)."""

    inputs: Tensor
    targets: Tensor
    aux: Mapping[str, Tensor] = {}


# -- model slots (nn.Modules; nothing here is called through pluggy while the model runs) ----------------------
@runtime_checkable
class EmbeddingModule(Protocol):
    """``forward(input_ids (B,T)) -> x (B,T,d)``; ``tok_emb`` is the token table (tied heads read it)."""

    tok_emb: nn.Embedding

    def __call__(self, input_ids: Tensor) -> Tensor: ...


@runtime_checkable
class AttentionModule(Protocol):
    """``forward(x (B,T,d), aux=None) -> y (B,T,d)``; built per layer (``ctx.layer``)."""

    def __call__(self, x: Tensor, aux: Mapping[str, Tensor] | None = None) -> Tensor: ...


@runtime_checkable
class MLPModule(Protocol):
    """``forward(x (B,T,d)) -> y (B,T,d)``; built per layer (``ctx.layer``)."""

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class BlockModule(Protocol):
    """``forward(x, x0, aux=None) -> x``: one residual block around the layer's attention and MLP."""

    def __call__(self, x: Tensor, x0: Tensor, aux: Mapping[str, Tensor] | None = None) -> Tensor: ...


@runtime_checkable
class TopologyModule(Protocol):
    """``forward(x, x0, blocks, aux) -> x``: runs the blocks (order, skips, repeats)."""

    def __call__(self, x: Tensor, x0: Tensor, blocks: nn.ModuleList, aux: Mapping[str, Tensor]) -> Tensor: ...


@runtime_checkable
class HeadModule(Protocol):
    """``logits(x (B,T,d) or (N,d), tok_weight) -> (N, V)`` soft-capped logits. ``project(x, tok_weight)`` gives
    the logits before the cap and ``cap(z)`` applies it, for evaluators that adapt the logits."""

    def logits(self, x: Tensor, tok_weight: Tensor) -> Tensor: ...

    def project(self, x: Tensor, tok_weight: Tensor) -> Tensor: ...

    def cap(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class LossModule(Protocol):
    """``forward(logits (N,V), targets (N,)) -> mean loss`` (training and periodic validation)."""

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor: ...


# -- build-time and loop slots ---------------------------------------------------------------------------------
@runtime_checkable
class Initializer(Protocol):
    """``init(model)`` writes the initial weights after every module was built. ``writes_block_weights = True``
    asks pgolf to build the blocks' ``CastedLinear``s without their constructor's RNG draw (banked inits)."""

    writes_block_weights: bool

    def __call__(self, model: nn.Module) -> None: ...


class OptimizerFactory(Protocol):
    """``make(model, runtime) -> OptimizerSet`` (``pgolf_core.optim``): groups the parameters and steps them."""

    def __call__(self, model: nn.Module, runtime: Any) -> Any: ...


@runtime_checkable
class Schedule(Protocol):
    """``lr_mul(step, elapsed_ms) -> float``: the LR multiplier of a step (0-based)."""

    def lr_mul(self, step: int, elapsed_ms: float) -> float: ...


@runtime_checkable
class Averaging(Protocol):
    """``export_weights(model) -> state_dict``: the weights to quantize (may observe loop events)."""

    def export_weights(self, model: nn.Module) -> dict[str, Tensor]: ...


@runtime_checkable
class Quantizer(Protocol):
    """``quantize(weights, roles) -> (obj, stats)`` and ``dequantize(obj) -> weights``; ``label`` names it in
    the log lines (``final_int6_…``). ``roles`` maps each weight name to its role (``pgolf_core.model.roles``)."""

    label: str

    def quantize(self, weights: dict[str, Tensor], roles: Mapping[str, str]) -> tuple[Any, dict[str, int]]: ...

    def dequantize(self, obj: Any) -> dict[str, Tensor]: ...


@runtime_checkable
class Compressor(Protocol):
    """``compress(obj) -> bytes`` and ``decompress(bytes) -> obj``: receives the quantizer's structured object (a
    dict of tensors and metadata) and owns its serialization; ``label`` names it in the log lines."""

    label: str

    def compress(self, obj: Any) -> bytes: ...

    def decompress(self, data: bytes) -> Any: ...


@runtime_checkable
class Evaluator(Protocol):
    """``evaluate(model, env, quant, comp) -> [FinalResult, ...]`` on the round-tripped model; ``reported_lines``
    names those lines before anything runs and ``compliance_for(line)`` says whether each is within the rules.
    ``eval_seq_len`` is the longest sequence it scores (the validation split is trimmed to whole sequences of it)."""

    eval_seq_len: int

    def evaluate(self, model: nn.Module, env: Any, quant: str, comp: str) -> list[FinalResult]: ...

    def reported_lines(self, quant: str, comp: str) -> list[str]: ...

    def compliance_for(self, line_name: str) -> Compliance: ...


@runtime_checkable
class TokenLoader(Protocol):
    """``next_batch(batch_tokens, seq_len, grad_accum) -> Batch`` for this rank; resumable through its state."""

    def next_batch(self, batch_tokens: int, seq_len: int, grad_accum: int) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LoaderFactory(Protocol):
    """``make(files, rank, world_size, device, vocab_size) -> TokenLoader`` (a fresh stream each call)."""

    def __call__(self, files: Sequence[Any], rank: int, world_size: int, device: Any, vocab_size: int) -> TokenLoader: ...


@runtime_checkable
class ByteCounts(Protocol):
    """``count(prev_ids, tgt_ids, first_pos) -> int tensor``: the UTF-8 bytes each target token stands for, the
    denominator of val_bpb. ``first_pos`` is the validation-stream position of ``tgt_ids[0]`` (targets are
    contiguous), for byte tables kept per position (a lossless text transform's sidecar)."""

    def count(self, prev_ids: Tensor, tgt_ids: Tensor, first_pos: int) -> Tensor: ...


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer behind val_bpb: ``load(path, vocab_size)`` checks the model file, ``byte_counts(val_tokens,
    device) -> ByteCounts`` gives the byte accounting, ``check_shards(val_tokens, data_path)`` refuses shards
    made with another tokenizer."""

    def load(self, path: str, vocab_size: int) -> None: ...

    def byte_counts(self, val_tokens: Tensor, device: Any) -> ByteCounts: ...

    def check_shards(self, val_tokens: Tensor, data_path: str) -> None: ...


@runtime_checkable
class Modifier(Protocol):
    """``transform(spec, layers, name)`` rewrites the model spec before modules exist: ``spec.install`` a module
    at a host's site, ``spec.replace`` a host's part, ``spec.claim`` an option, ``spec.add_root_module``."""

    def transform(self, spec: Any, layers: list[int], name: str) -> None: ...


# -- capabilities ------------------------------------------------------------------------------------------------
@runtime_checkable
class Attaching(Protocol):
    """``attach(model)``: called once the model is built and initialised, before it is compiled."""

    def attach(self, model: nn.Module) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """State that must survive a checkpoint: ``state_dict()`` / ``load_state_dict(state)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Calibrating(Protocol):
    """``calibrate(ctx: CalibrationContext)`` runs after the weights are averaged, before ``quantize``; the
    phase is timed. ``compliance`` says whether its data source is allowed."""

    compliance: Sequence[Compliance]

    def calibrate(self, ctx: Any) -> None: ...


@runtime_checkable
class ReservesTrainTime(Protocol):
    """A built object whose post-training work must count as training time (calibration on training data has
    to happen inside the wallclock cap): ``train_time_reserve_s`` seconds are taken off ``run.max_wallclock_seconds``
    for the loop, so that work runs in the reserved slice. No effect without a wallclock cap."""

    train_time_reserve_s: float


@runtime_checkable
class BudgetAware(Protocol):
    """``set_train_budget(budget_ms)``: told the training loop's effective wallclock budget (the cap less every
    reserve, ``None`` without a cap) before training starts; a schedule that runs on the fraction of that
    budget reads it here."""

    def set_train_budget(self, budget_ms: float | None) -> None: ...


def train_time_reserve(objects: Sequence[Any]) -> float:
    """The seconds the built objects reserve from the training clock, together."""
    return float(sum(max(float(o.train_time_reserve_s), 0.0) for o in objects if isinstance(o, ReservesTrainTime)))


def train_budget_ms(max_wallclock_seconds: float, reserve_s: float) -> float | None:
    """The loop's wallclock budget in ms: the cap less the reserve, ``None`` without a cap."""
    if max_wallclock_seconds <= 0:
        return None
    return 1000.0 * (max_wallclock_seconds - reserve_s)


@runtime_checkable
class Fitting(Protocol):
    """``fit(obj, measure) -> obj``: shrink a quantized object until ``measure(obj)`` (code + compressed bytes)
    meets a target (selective pruning)."""

    def fit(self, obj: Any, measure: Callable[[Any], int]) -> Any: ...


@runtime_checkable
class FinalEvalAware(Protocol):
    """``prepare_final_eval()``: the model module switches to what the final scores need (plain CE for a focal
    loss) after the artifact is loaded back."""

    def prepare_final_eval(self) -> None: ...


@runtime_checkable
class SequentialView(Protocol):
    """``sequential_view()``: a context manager under which the model runs each block once, in order (depth
    recurrence and parallel wirings off), for calibration that needs the plain data flow."""

    def sequential_view(self) -> contextlib.AbstractContextManager: ...


@runtime_checkable
class AuxProvider(Protocol):
    """A model-level module (``spec.add_root_module``) with ``aux(input_ids) -> {name: tensor}``: tensors computed
    once per forward and handed to every block and attention (shared value embeddings)."""

    def aux(self, input_ids: Tensor) -> dict[str, Tensor]: ...


LOOP_EVENTS = ("on_train_start", "on_step_start", "after_optimizer_step", "on_step_end", "on_eval_start", "on_eval_end", "on_train_end")
"""Methods a built object may define to be called at loop boundaries (see ``pgolf_core.hookspecs``)."""


@dataclasses.dataclass(frozen=True)
class SlotContract:
    """A slot: what its ``build`` receives and what it must return (``protocol``)."""

    name: str
    signature: str
    returns: str
    protocol: Any
    required: bool = True

    def accepts(self, obj: Any) -> bool:
        """Whether a built object meets the contract (factories, plain callables, are only checked for being callable)."""
        if self.protocol in (OptimizerFactory, LoaderFactory):
            return callable(obj)
        return isinstance(obj, self.protocol)


SLOT_CONTRACTS: dict[str, SlotContract] = {
    c.name: c
    for c in (
        SlotContract("embedding", "build(params, ctx)", "nn.Module: forward(input_ids) -> x; attribute tok_emb", EmbeddingModule),
        SlotContract("attention", "build(params, ctx)", "nn.Module: forward(x, aux=None) -> y; ctx.layer is the block index", AttentionModule),
        SlotContract("mlp", "build(params, ctx)", "nn.Module: forward(x) -> y; ctx.layer is the block index", MLPModule),
        SlotContract("residual", "build(params, ctx, attn, mlp)", "nn.Module block: forward(x, x0, aux=None) -> x", BlockModule),
        SlotContract("topology", "build(params, ctx)", "nn.Module: forward(x, x0, blocks, aux) -> x", TopologyModule),
        SlotContract("head", "build(params, ctx)", "nn.Module: logits(x, tok_weight) -> soft-capped logits; project(), cap()", HeadModule),
        SlotContract("loss", "build(params, ctx)", "nn.Module: forward(logits, targets) -> mean training loss", LossModule),
        SlotContract("init", "build(params, ctx)", "callable(model) writing the initial weights; attribute writes_block_weights", Initializer),
        SlotContract("optimizer", "build(params, ctx)", "callable(model, runtime) -> OptimizerSet", OptimizerFactory),
        SlotContract("schedule", "build(params, ctx)", "object: lr_mul(step, elapsed_ms) -> float", Schedule),
        SlotContract("averaging", "build(params, ctx)", "object: export_weights(model) -> state_dict", Averaging),
        SlotContract("quantizer", "build(params, ctx)", "object: quantize(weights, roles) -> (obj, stats), dequantize(obj) -> weights, label", Quantizer),
        SlotContract("compressor", "build(params, ctx)", "object: compress(obj) -> bytes, decompress(bytes) -> obj, label", Compressor),
        SlotContract("evaluator", "build(params, ctx)", "object: evaluate(model, env, quant, comp) -> [FinalResult], reported_lines(), compliance_for()", Evaluator),
        SlotContract("tokenizer", "build(params, ctx)", "object: load(path, vocab), byte_counts(val_tokens, device) -> ByteCounts, check_shards()", Tokenizer),
        SlotContract("loader", "build(params, ctx)", "callable(files, rank, world_size, device, vocab) -> TokenLoader", LoaderFactory),
        SlotContract("modifier", "build(params, ctx)", "object: transform(spec, layers, name); optional attach(model), loop events, state", Modifier, required=False),
    )
}

CAPABILITIES: dict[str, Any] = {
    p.__name__: p for p in (Attaching, Stateful, Calibrating, ReservesTrainTime, BudgetAware, Fitting, FinalEvalAware, SequentialView, AuxProvider)
}


def capable(obj: Any, protocol: Any) -> bool:
    """``isinstance`` against a capability protocol (a named helper so call sites read as intent)."""
    return isinstance(obj, protocol)


def loop_handlers(objects: Sequence[Any], event: str) -> list[Callable[[Any], None]]:
    """The bound ``event`` methods of ``objects`` (in order) that exist."""
    if event not in LOOP_EVENTS:
        raise ValueError(f"unknown loop event {event!r}")
    return [getattr(o, event) for o in objects if callable(getattr(o, event, None))]


def iter_capable(objects: Sequence[Any], protocol: Any) -> Iterator[Any]:
    return (o for o in objects if isinstance(o, protocol))
