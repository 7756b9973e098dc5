"""Cross-field checks that no single table can make: geometry, memory, requires/conflicts, layer selectors."""

from __future__ import annotations

import attrs

from ..errors import ConfigError
from ..registry import Registry
from .schema import Stack


def parse_layers(selector: object, num_layers: int) -> list[int]:
    """Layer selector → sorted layer indices.

    Accepted: ``"all"``, ``"last N"``, ``"first N"``, a Python-style slice ``"-4:"`` / ``"2:5"``, or a list of
    indices (negative counts from the end). A selector that picks no layer (``"last 0"``, ``"4:2"``, ``[]``) or
    names layers the model does not have (``"last 20"`` of 11, ``"0:20"``) is an error, not a silent no-op or
    a quiet clamp: either one usually means the stack was written for another depth. Raises ``ValueError``
    with the reason.
    """
    if isinstance(selector, list):
        out = []
        for item in selector:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"layer list must hold ints, got {item!r}")
            index = item + num_layers if item < 0 else item
            if not 0 <= index < num_layers:
                raise ValueError(f"layer {item} is outside 0..{num_layers - 1}")
            out.append(index)
        if not out:
            raise ValueError("an empty layer list selects no layer; drop the modifier or list layers")
        return sorted(set(out))
    if not isinstance(selector, str):
        raise ValueError(f"expected a selector string or a list of ints, got {type(selector).__name__}")
    text = selector.strip()
    words = text.split()
    if text == "all":
        return list(range(num_layers))
    if len(words) == 2 and words[0] in ("last", "first") and words[1].isdigit():
        n = int(words[1])
        if n == 0:
            raise ValueError(f"{text!r} selects no layer; drop the modifier or select at least one layer")
        if n > num_layers:
            raise ValueError(f"{text!r} asks for {n} layers but the model has {num_layers} (model.num_layers); use 'all' or a smaller N")
        return list(range(num_layers - n, num_layers)) if words[0] == "last" else list(range(n))
    if ":" in text:
        lo, _, hi = text.partition(":")
        try:
            bounds = [int(b) if b.strip() else None for b in (lo, hi)]
        except ValueError:
            raise ValueError(f"bad slice {text!r}") from None
        for b in bounds:
            if b is not None and not -num_layers <= b <= num_layers:
                raise ValueError(f"slice {text!r} names layer {b}, but the model has {num_layers} layers (model.num_layers)")
        out = list(range(num_layers))[slice(*bounds)]
        if not out:
            raise ValueError(f"slice {text!r} selects no layer of {num_layers}; drop the modifier or widen the slice")
        return out
    raise ValueError(f"unknown selector {text!r}; use 'all', 'last N', 'first N', 'a:b' or a list")


GIB = 1024**3
MAX_PROCESS_BYTES = 4 * 1024**4
"""No single process gets 4 TiB (the largest accelerators hold 141-192 GB, large hosts a few TB): a stack whose
lower-bound estimate is above this is refused by ``pgolf validate`` on any machine."""


@attrs.define(frozen=True)
class MemoryEstimate:
    """A lower bound of what one training process holds, from the core geometry alone (nothing is built).

    Parameters: the token embedding (and an untied head) plus each layer's attention projections (q, k, v, o);
    MLPs and extras only add to it. Bytes: fp32 weights, their gradients and one fp32 optimizer state per
    parameter (12 bytes), plus one micro-batch's activations at 2 bytes (bf16) for two tensors of width
    model_dim per layer, plus the fp32 logits of the larger of a training micro-batch and a validation batch.
    Being a lower bound, it refuses only what cannot fit."""

    params: int
    state_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def describe(self) -> str:
        return (
            f"at least {self.total_bytes / GIB:,.1f} GiB per process ({self.params:,} parameters: "
            f"{self.state_bytes / GIB:,.1f} GiB for weights, gradients and optimizer state; "
            f"{self.activation_bytes / GIB:,.1f} GiB of activations and logits)"
        )


def memory_estimate(stack: Stack, params: int | None = None) -> MemoryEstimate:
    """``params``: the exact count when the model was built on the meta device; else the lower bound above."""
    m, d = stack.model, stack.data
    dim, layers, vocab = m.model_dim, m.num_layers, m.vocab_size
    kv_dim = dim * m.num_kv_heads // max(m.num_heads, 1)
    if params is None:
        params = vocab * dim * (1 if m.tie_embeddings else 2) + layers * (2 * dim * dim + 2 * dim * kv_dim)
    base = stack.run.grad_accum_base
    micro_tokens = max(d.train_batch_tokens // base, 1)
    val_tokens = max(d.val_batch_size // base, 1)
    activations = micro_tokens * 2 * dim * layers * 2 + max(micro_tokens, val_tokens) * vocab * 4
    return MemoryEstimate(params, params * 12, activations)


def check_memory(stack: Stack, available: int, where: str, params: int | None = None) -> MemoryEstimate:
    """Refuse geometry whose lower-bound estimate exceeds ``available`` bytes, before anything is allocated."""
    estimate = memory_estimate(stack, params)
    if estimate.total_bytes > available:
        raise ConfigError(
            f"{stack.path}: model.model_dim={stack.model.model_dim} model.num_layers={stack.model.num_layers} "
            f"model.vocab_size={stack.model.vocab_size} data.train_batch_tokens={stack.data.train_batch_tokens} need "
            f"{estimate.describe()}, more than {where} ({available / GIB:,.1f} GiB); shrink the model or the batch "
            "(or raise run.grad_accum_base)"
        )
    return estimate


def check_stack(stack: Stack, registry: Registry, origins: dict[str, str] | None = None) -> None:
    """``origins`` maps key paths (``model.num_layers``, ``modifier[3].layers``) to the ``--set``/``--toy`` that
    set them, so a problem an override caused names that override rather than the stack file."""
    problems: list[str] = []
    m = stack.model
    origins = origins or {}

    def blame(*keys: str) -> str:
        return next((origins[k] for k in keys if k in origins), stack.path)

    where = blame("model.model_dim", "model.num_heads", "model.num_kv_heads")
    if m.model_dim % m.num_heads:
        problems.append(f"{where}: model.model_dim={m.model_dim} is not divisible by model.num_heads={m.num_heads}")
    elif (m.model_dim // m.num_heads) % 2:
        problems.append(f"{where}: head dim model_dim/num_heads={m.model_dim // m.num_heads} must be even for RoPE")
    if m.num_heads % m.num_kv_heads:
        problems.append(f"{where}: model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    d = stack.data
    base = stack.run.grad_accum_base
    where = blame("data.train_batch_tokens", "data.train_seq_len", "run.grad_accum_base")
    if d.train_batch_tokens % d.train_seq_len:
        problems.append(
            f"{where}: data.train_batch_tokens={d.train_batch_tokens} is not a multiple of data.train_seq_len={d.train_seq_len}"
        )
    elif d.train_batch_tokens % (base * d.train_seq_len):
        # world_size x grad_accum_steps is run.grad_accum_base on any number of processes
        problems.append(
            f"{where}: data.train_batch_tokens={d.train_batch_tokens} is not divisible by world_size*grad_accum*train_seq_len="
            f"run.grad_accum_base*data.train_seq_len={base}*{d.train_seq_len}; every micro-batch must hold whole sequences"
        )
    if d.val_batch_size // base < d.train_seq_len:  # world_size x grad_accum_steps = base: one sequence per micro-batch
        problems.append(
            f"{where}: data.val_batch_size={d.val_batch_size} gives less than one sequence of data.train_seq_len={d.train_seq_len} "
            f"per validation micro-batch (run.grad_accum_base={base}); raise it to at least {base * d.train_seq_len}"
        )
    if not problems:
        try:
            check_memory(stack, MAX_PROCESS_BYTES, "any single process gets")
        except ConfigError as exc:
            problems += exc.problems

    used = {c.technique for c in stack.slots.values()} | {mc.technique for mc in stack.modifiers}
    for i, mod in enumerate(stack.modifiers):
        try:
            parse_layers(mod.layers, m.num_layers)
        except ValueError as exc:
            problems.append(f"{blame(f'modifier[{i}].layers', 'model.num_layers')}: modifier[{i}]({mod.technique}).layers: {exc}")
    where = stack.path
    choices = [(s, c.technique) for s, c in stack.slots.items()] + [("modifier", mc.technique) for mc in stack.modifiers]
    for slot, name in choices:
        reg = registry.get(slot, name)
        if reg is None:
            continue
        for need in reg.technique.requires:
            if need not in used:
                problems.append(f"{where}: technique '{name}' requires '{need}', which the stack does not use; add it or drop '{name}'")
        for other in reg.technique.conflicts:
            if other in used:
                problems.append(f"{where}: techniques '{name}' and '{other}' cannot be combined; drop one")
    if problems:
        raise ConfigError(*problems)
