"""``--toy``: any stack at CPU toy size, offline, on the built-in sample of its own vocabulary.

Shrinking a real stack by hand takes a dozen ``--set`` flags and quietly distorts it: a recurrence that starts
at step 3000 never fires in a 40-step run, EMA with decay 0.997 over 40 steps exports near-initial weights,
a 1024-token NTK threshold never triggers at a 128-token context. ``toy_settings`` derives the toy from the
resolved stack instead, with one rule per kind of number, so every technique switch of the full recipe also
happens in the toy, at the same fraction of the run:

=========== ======================================================================= ===========================
rule        what scales                                                             examples
=========== ======================================================================= ===========================
``steps``   a step count: kept as a fraction of ``run.iterations`` (at least 1)     warmdown, recurrence start,
                                                                                    SWA/shadow-SWA period,
                                                                                    momentum warm-up
``seq``     a length in tokens: kept as a fraction of ``data.train_seq_len``        eval window and stride, NTK
                                                                                    threshold, calibration length
``seqs``    a number of sequences: kept as a fraction of the sequences in a step    GPTQ calibration sequences
``width``   a width: kept as a fraction of ``model.model_dim``                      BigramHash / VE table width
``area``    an element count: kept as a fraction of ``model_dim²``                  ``keep_float_max_numel``
``head_dim`` rotated dims: kept as a fraction of the head dim, even                 partial RoPE's ``rope_dims``
``horizon`` an averaging decay: its horizon 1/(1-d) kept as a fraction of the run   EMA decay
``keep``    unchanged                                                               a conv kernel length
a number    unchanged, at most that number                                          SLOT optimiser steps
=========== ======================================================================= ===========================

A parameter gets its rule from its ``param(..., toy=...)`` metadata, else from its ``unit`` (``"steps"``,
``"tokens"``) or its name (``*_numel`` → area, ``dim``/``*_dim`` → width); anything else is kept. The core
tables shrink to the sizes below; ``model.num_layers`` is kept, so layer selectors (``"last 4"``, ``[9, 10]``,
``"7:"``) and the U-Net's encoder/decoder split keep their meaning. LR multipliers and thresholds on them
(late QAT at 0.15, SWA below 0.2) are fractions already and stay.

The result is a list of ``key=value`` settings that ``load_stack(..., toy=...)`` applies before any
``--set``, so ``pgolf config STACK --toy`` shows the toy and a ``--set`` changes the toy's values.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from .config.diff import toml_value
from .config.schema import Stack
from .errors import ConfigError
from .sample import for_vocab

RULES = ("keep", "steps", "seq", "seqs", "width", "area", "head_dim", "horizon")


@attrs.define(frozen=True)
class ToySize:
    """The toy's core sizes; each is an upper bound (a stack already smaller keeps its own)."""

    iterations: int = 40  # enough for a 10% warmdown of the run to span the last ~4 steps (late QAT at 0.1 fires)
    warmup_steps: int = 2
    head_dim: int = 16
    max_heads: int = 4
    seq_len: int = 128
    batch_tokens: int = 2048  # 16 sequences: a toy step costs about half a second on one busy core
    val_batch_tokens: int = 16384
    grad_accum_base: int = 2  # micro-batches per step: 1 or 2 processes; the gradient is the same mean


TOY = ToySize()


@attrs.define(frozen=True)
class Scale:
    """Full size → toy size ratios, from which every rule is computed."""

    steps: float  # toy iterations / full iterations
    seq: float  # toy train_seq_len / full
    seqs: float  # sequences per toy step / per full step
    width: float  # toy model_dim / full
    head_dim: float  # toy head dim / full
    toy_head_dim: int


def _heads(num_heads: int, num_kv_heads: int, size: ToySize) -> tuple[int, int]:
    """The toy's (heads, KV heads): at most ``max_heads``, keeping the query-per-KV group size."""
    if num_heads <= size.max_heads:
        return num_heads, num_kv_heads
    group = num_heads // num_kv_heads
    for heads in range(size.max_heads, 0, -1):
        if heads % group == 0:
            return heads, heads // group
    return group, 1


def _core(stack: Stack, size: ToySize, out: dict[str, Any], notes: list[str]) -> Scale:
    run, data, model = stack.run, stack.data, stack.model
    iterations = min(run.iterations, size.iterations)
    steps = iterations / run.iterations if run.iterations else 1.0
    out["run.iterations"] = iterations
    out["run.warmup_steps"] = min(run.warmup_steps, size.warmup_steps)
    out["run.max_wallclock_seconds"] = 0.0  # the schedule follows steps, so the fractions hold
    for key in ("val_loss_every", "train_log_every"):
        value = getattr(run, key)
        out[f"run.{key}"] = max(1, round(value * steps)) if value > 0 else 0
    accum = min(run.grad_accum_base, size.grad_accum_base)
    out["run.grad_accum_base"] = accum

    seq = min(data.train_seq_len, size.seq_len)
    batch = min(data.train_batch_tokens, size.batch_tokens)
    batch = max(batch // (accum * seq), 1) * accum * seq
    out["data.train_seq_len"], out["data.train_batch_tokens"] = seq, batch
    out["data.val_batch_size"] = max(min(data.val_batch_size, size.val_batch_tokens), accum * seq)
    sample = for_vocab(model.vocab_size)
    if sample is not None:
        out["data.path"] = out["data.tokenizer"] = sample
    else:
        notes.append(
            f"no built-in sample for model.vocab_size={model.vocab_size} (there are sp1024, sp4096, sp8192); "
            "the toy keeps data.path and data.tokenizer"
        )

    head_dim = model.model_dim // model.num_heads
    if model.model_dim <= size.head_dim * size.max_heads:  # already toy-sized
        heads, kv, toy_head_dim = model.num_heads, model.num_kv_heads, head_dim
    else:
        heads, kv = _heads(model.num_heads, model.num_kv_heads, size)
        toy_head_dim = min(head_dim, size.head_dim)
    out["model.num_heads"], out["model.num_kv_heads"] = heads, kv
    out["model.model_dim"] = heads * toy_head_dim
    full_seqs = data.train_batch_tokens / data.train_seq_len
    return Scale(
        steps=steps,
        seq=seq / data.train_seq_len,
        seqs=(batch / seq) / full_seqs,
        width=heads * toy_head_dim / model.model_dim,
        head_dim=toy_head_dim / head_dim,
        toy_head_dim=toy_head_dim,
    )


def rule_for(attribute: attrs.Attribute) -> Any:
    """A parameter's toy rule: its ``toy`` metadata, else from its unit or name, else ``keep``."""
    declared = attribute.metadata.get("toy")
    if declared is not None:
        return declared
    unit = attribute.metadata.get("unit", "")
    name = attribute.name
    if unit == "steps":
        return "steps"
    if unit == "tokens":
        return "seq"
    if name.endswith("_numel"):
        return "area"
    if name == "dim" or name.endswith("_dim"):
        return "width"
    return "keep"


def scale_value(rule: Any, value: Any, scale: Scale) -> Any:
    """The toy value of one parameter under its rule (0 and negative values, which mean "off" or "default",
    are kept)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return min(value, type(value)(rule))
    if rule == "horizon":
        if not 0.0 < value < 1.0:
            return value
        horizon = scale.steps / (1.0 - value)
        return round(1.0 - 1.0 / horizon, 6) if horizon > 1.0 else 0.0
    if value <= 0 or rule == "keep":
        return value
    factor = {"steps": scale.steps, "seq": scale.seq, "seqs": scale.seqs, "width": scale.width, "area": scale.width**2}.get(rule)
    if rule == "head_dim":
        return min(max(2, 2 * round(value * scale.head_dim / 2)), scale.toy_head_dim)
    if factor is None:
        raise ConfigError(f"--toy: unknown toy rule {rule!r}; rules: {', '.join(RULES)} or a number")
    scaled = value * factor
    return max(1, round(scaled)) if isinstance(value, int) else scaled


def _params(params: Any, prefix: str, scale: Scale, out: dict[str, Any]) -> None:
    if not attrs.has(type(params)):
        return
    for a in attrs.fields(type(params)):
        value = getattr(params, a.name)
        new = scale_value(rule_for(a), value, scale)
        if new != value or type(new) is not type(value):
            out[f"{prefix}.{a.name}"] = new


def toy_settings(stack: Stack, size: ToySize = TOY) -> tuple[list[str], list[str]]:
    """``(settings, notes)``: the ``key=value`` settings that make ``stack`` its toy (only keys whose value
    changes), and notes on what could not be made toy (no sample for the vocabulary)."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    scale = _core(stack, size, out, notes)
    for slot, choice in stack.slots.items():
        _params(choice.params, slot, scale, out)
    names = [m.technique for m in stack.modifiers]
    seen: dict[str, int] = {}
    for mod in stack.modifiers:
        seen[mod.technique] = seen.get(mod.technique, 0) + 1
        key = f"modifier.{mod.technique}" + (f"#{seen[mod.technique]}" if names.count(mod.technique) > 1 else "")
        _params(mod.params, key, scale, out)
    current = _current(stack)
    settings = [f"{k}={toml_value(v)}" for k, v in out.items() if k not in current or current[k] != v or type(current[k]) is not type(v)]
    return settings, notes


def _current(stack: Stack) -> dict[str, Any]:
    return {
        f"{table}.{a.name}": getattr(getattr(stack, table), a.name)
        for table in ("run", "data", "model")
        for a in attrs.fields(type(getattr(stack, table)))
    }


def load_toy_stack(path: str | os.PathLike[str], registry: Any, overrides: list[str] | tuple[str, ...] = (), legacy_env: dict[str, str] | None = None) -> tuple[Stack, list[str]]:
    """The toy of the stack file at ``path``, then ``overrides`` and the legacy environment on top; and the notes.

    The toy is derived from the stack as written (its own values and defaults), so the same toy comes out
    whatever is set on top of it.
    """
    from .config import load_stack

    full = load_stack(path, registry)
    settings, notes = toy_settings(full)
    return load_stack(path, registry, overrides=overrides, legacy_env=legacy_env, toy=settings), notes
