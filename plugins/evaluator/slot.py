"""SLOT: the sliding window, then a small per-batch optimisation on top of the frozen hidden states.

Reports three lines, in order: the non-overlapping round trip at ``eval_seq_len`` (``final_{quant}_roundtrip``),
the sliding window (``final_{quant}_sliding_window``, the ``sliding_window`` evaluator's own code) and the
SLOT line. Windows, rank split, batches and byte counting are the sliding window's.

``variant = "scored"`` is PR #1319's ``eval_val_sliding_slot``, step for step. Per batch of ``batch_seqs``
windows: the frozen post-norm hidden states ``h`` (bf16 autocast where the run uses it, then fp32) and the
output weight ``W`` in fp32; a per-window offset ``delta`` (bsz, 1, d) and logit bias ``b`` (bsz, 1, V) in fp32,
started from ``warmstart`` × the previous batch's optimised values when the batch size is the same (else
zeros); a fresh ``torch.optim.AdamW([delta, b], lr)`` with torch's defaults (betas (0.9, 0.999), eps 1e-8,
weight decay 0.01); ``steps`` steps at ``lr_t = lr_min + (lr - lr_min)(1 + cos(pi t / steps)) / 2`` on the mean
NLL of ``cap * tanh(((h + delta) W^T + b) / cap)`` over the scored positions; then those positions are scored
with the final ``delta`` and ``b``, NLL summed in float64. Not within the rules: the optimisation sees the
very targets it then scores (``compliance_for``).

``variant = "causal"``: PR #1333's "causal SLOT" optimiser with a context that is really causal. One shared
offset (1, 1, d), zero-initialised, no bias, added to the hidden state *before* the final norm as #1333 does;
``AdamW(causal_lr, betas (causal_beta1, causal_beta2), eps causal_eps, weight decay causal_weight_decay)`` for
``causal_steps`` steps on the mean NLL of the context positions, then the scored positions are scored with it.
The context is every window position whose target lies before the batch's first scored token: tokens scored
by earlier batches. No context (the first batch): no optimisation.

``variant = "pr1333"``: PR #1333 exactly: the context is each window's own ``[0, s)``. That is not causal once a
batch holds more than one window: window ``i + 1``'s context ``[0, s)`` ends where window ``i``'s scored span
ends, so the shared offset is fitted on the tokens window ``i`` then scores.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_core.compliance import matches_label
from pgolf_core.contracts import Compliance, FinalResult
from pgolf_core.config.fields import non_negative, one_of, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.evaluator.sliding_window import (
    ScoreTotals,
    SlidingWindow,
    SlidingWindowParams,
    rank_share,
    scored_offset,
    window_batch,
    window_starts,
)

SCORED_REASON = (
    "optimises per-window parameters on the very tokens it then scores (the targets of the scored positions), so a "
    "token's score depends on itself — breaks causality (README FAQ; issue #1017 condition C1/C3)"
)
CAUSAL_REASON = (
    "the shared offset is fitted only on targets scored by earlier batches (positions before the batch's first "
    "scored token), so each token's score depends on the artifact and preceding tokens only — test-time training "
    "on already-evaluated tokens (README FAQ; issue #1017 conditions C1 and C3)"
)
PR1333_REASON = (
    "the batch's shared offset is fitted on every window's context [0, s), and a later window's context holds the "
    "tokens an earlier window of the same batch scores, so those tokens' scores depend on themselves and on later "
    "tokens — breaks causality (issue #1017 condition C1; the PR #1240 flip test)"
)


@attrs.define(frozen=True, kw_only=True)
class SlotParams:
    variant: str = param(
        "scored",
        help="'scored': PR #1319 (fits the scored targets; not within the rules); 'causal': PR #1333's optimiser on "
        "tokens scored by earlier batches; 'pr1333': PR #1333 exactly (each window's own context; leaks within a batch)",
        validator=one_of("scored", "causal", "pr1333"),
    )
    eval_seq_len: int = param(2048, help="window length; 0 uses data.train_seq_len", unit="tokens", env="EVAL_SEQ_LEN", validator=non_negative)
    stride: int = param(64, help="tokens between window starts (and scored per window)", unit="tokens", env="EVAL_STRIDE", validator=positive)
    batch_seqs: int = param(32, help="windows per batch (one SLOT optimisation per batch)", env="EVAL_BATCH_SEQS", validator=positive)
    steps: int = param(64, help="scored variant: optimiser steps per batch", env="SLOT_STEPS", validator=non_negative, toy=4)
    lr: float = param(0.01, help="scored variant: peak AdamW learning rate (cosine from lr to lr_min over the steps)", env="SLOT_LR", validator=non_negative)
    lr_min: float = param(0.001, help="scored variant: learning rate the cosine decays towards", env="SLOT_LR_MIN", validator=non_negative)
    warmstart: float = param(
        0.85, help="scored variant: start from this × the previous batch's delta and bias (0: from zeros)", env="SLOT_WARMSTART", validator=non_negative
    )
    causal_steps: int = param(8, help="causal variants: AdamW steps per batch on the context NLL", validator=non_negative, toy=4)
    causal_lr: float = param(0.005, help="causal variants: AdamW learning rate (constant)", validator=non_negative)
    causal_beta1: float = param(0.3, help="causal variants: AdamW beta1", validator=non_negative)
    causal_beta2: float = param(0.9, help="causal variants: AdamW beta2", validator=non_negative)
    causal_eps: float = param(1e-5, help="causal variants: AdamW eps", validator=positive)
    causal_weight_decay: float = param(1e-8, help="causal variants: AdamW weight decay", validator=non_negative)
    roundtrip_label: str = param("final_{quant}_roundtrip", help="name of the non-overlapping round-trip line")
    sliding_label: str = param("final_{quant}_sliding_window", help="name of the sliding-window line")
    label: str = param("", help="name of the SLOT line; empty: final_slot (variant scored) or final_causal_slot (the causal variants)")


# -- the scored variant (PR #1319) ---------------------------------------------------------------------------
def slot_lr(step: int, steps: int, lr: float, lr_min: float) -> float:
    """PR #1319's cosine: ``lr`` at step 0, approaching ``lr_min`` (reached at ``step == steps``, never taken)."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * step / steps))


def slot_logits(hidden: Tensor, weight: Tensor, cap: Callable[[Tensor], Tensor] | float, delta: Tensor, bias: Tensor) -> Tensor:
    """``cap((hidden + delta) W^T + bias)``, in the reference's order of operations; ``cap`` is the head's soft
    cap (a number ``c`` means ``c * tanh(z / c)``, the softcap head's)."""
    h = hidden + delta
    proj = F.linear(h, weight) + bias
    if callable(cap):
        return cap(proj)
    return cap * torch.tanh(proj / cap)


def slot_init(prev: tuple[Tensor, Tensor] | None, bsz: int, dim: int, vocab: int, warmstart: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Starting delta (bsz, 1, dim) and logit bias (bsz, 1, vocab): ``warmstart`` × the previous batch's
    optimised values when there is one of the same batch size, else zeros."""
    if warmstart > 0 and prev is not None and prev[0].size(0) == bsz:
        delta = (warmstart * prev[0].detach().clone()).requires_grad_(True)
        bias = (warmstart * prev[1].detach().clone()).requires_grad_(True)
    else:
        delta = torch.zeros(bsz, 1, dim, device=device, dtype=torch.float32, requires_grad=True)
        bias = torch.zeros(bsz, 1, vocab, device=device, dtype=torch.float32, requires_grad=True)
    return delta, bias


def fit_scored(
    hidden: Tensor, weight: Tensor, softcap: float, targets: Tensor, mask: Tensor, delta: Tensor, bias: Tensor,
    steps: int, lr: float, lr_min: float,
) -> None:
    """Optimise ``delta`` and ``bias`` in place: a fresh AdamW (torch defaults, weight decay 0.01), ``steps`` steps
    on the mean NLL over ``mask`` (1.0 at the positions to fit)."""
    opt = torch.optim.AdamW([delta, bias], lr=lr)
    valid = mask.sum()
    flat = targets.reshape(-1)
    for step in range(steps):
        step_lr = slot_lr(step, steps, lr, lr_min)
        for group in opt.param_groups:
            group["lr"] = step_lr
        logits = slot_logits(hidden, weight, softcap, delta, bias)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), flat, reduction="none").reshape(mask.shape)
        loss = (nll * mask).sum() / valid
        opt.zero_grad()
        loss.backward()
        opt.step()


def output_weight(model: nn.Module) -> Tensor:
    """The output projection in fp32, as the head computes its logits (the tied token table, or its own)."""
    return model.head.output_weight(model.embedding.tok_emb.weight).detach().float()


def _eval_scored(base_model, env, p: SlotParams, seq_len: int, total: int, mine: list[int], totals: ScoreTotals) -> None:
    tokens, device = env.val.tokens, env.device
    hidden_fn = env.compiled(base_model.hidden)
    weight = output_weight(base_model)
    softcap = base_model.head.cap
    prev = None
    for bi in range(0, len(mine), p.batch_seqs):
        batch = mine[bi : bi + p.batch_seqs]
        bsz = len(batch)
        x, y, wlens = window_batch(tokens, batch, seq_len, total, device)
        with torch.no_grad(), env.autocast():
            hidden = hidden_fn(x)
        hidden = hidden.float()
        offsets = [scored_offset(ws, wlens[i], p.stride) for i, ws in enumerate(batch)]
        mask = torch.zeros(bsz, seq_len, device=device)
        for i in range(bsz):
            mask[i, offsets[i] : wlens[i]] = 1.0
        delta, bias = slot_init(prev, bsz, hidden.size(-1), weight.size(0), p.warmstart, device)
        fit_scored(hidden, weight, softcap, y, mask, delta, bias, p.steps, p.lr, p.lr_min)
        if p.warmstart > 0:
            prev = (delta.detach(), bias.detach())
        with torch.no_grad():
            logits = slot_logits(hidden, weight, softcap, delta, bias)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").reshape(bsz, seq_len)
        for i, ws in enumerate(batch):
            totals.add(env.val, nll[i], x[i], y[i], ws, offsets[i], wlens[i])


# -- the causal variants (PR #1333's optimiser) ----------------------------------------------------------------
@contextlib.contextmanager
def pre_norm_hidden(model: nn.Module) -> Iterator[nn.Module]:
    """``model.hidden`` returns the residual stream before the final norm for the duration; yields the norm."""
    norm = model.final_norm
    model.final_norm = nn.Identity()
    try:
        yield norm
    finally:
        model.final_norm = norm


def context_lengths(batch: list[int], wlens: list[int], offsets: list[int], variant: str) -> list[int]:
    """How many leading positions of each window the causal variants fit on. ``causal``: those whose target
    precedes the batch's first scored token (tokens scored by earlier batches). ``pr1333``: each window's own
    ``[0, s)``."""
    if variant == "pr1333":
        return list(offsets)
    first = min(ws + s for ws, s in zip(batch, offsets))
    return [min(max(first - ws, 0), wlen) for ws, wlen in zip(batch, wlens)]


def _autocast_dtype(env) -> torch.dtype:
    with env.autocast():
        kind = env.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def _eval_causal(base_model, env, p: SlotParams, seq_len: int, total: int, mine: list[int], totals: ScoreTotals) -> None:
    tokens, device = env.val.tokens, env.device
    act_dtype = _autocast_dtype(env)
    tok_weight = base_model.embedding.tok_emb.weight

    def logits_of(norm: nn.Module, h: Tensor) -> Tensor:
        with env.autocast():
            return base_model.head.logits(norm(h.to(act_dtype)), tok_weight).float()

    with pre_norm_hidden(base_model) as norm:
        hidden_fn = env.compiled(base_model.hidden)
        for bi in range(0, len(mine), p.batch_seqs):
            batch = mine[bi : bi + p.batch_seqs]
            bsz = len(batch)
            x, y, wlens = window_batch(tokens, batch, seq_len, total, device)
            with torch.no_grad(), env.autocast():
                hidden = hidden_fn(x)
            hidden = hidden.detach().float()
            offsets = [scored_offset(ws, wlens[i], p.stride) for i, ws in enumerate(batch)]
            lengths = context_lengths(batch, wlens, offsets, p.variant)
            mask = torch.zeros(bsz, seq_len, dtype=torch.bool, device=device)
            for i, n in enumerate(lengths):
                if n > 0:
                    mask[i, :n] = True
            delta = torch.zeros(1, 1, hidden.size(-1), device=device, dtype=hidden.dtype, requires_grad=True)
            if any(n > 0 for n in lengths) and p.causal_steps > 0:
                opt = torch.optim.AdamW(
                    [delta], lr=p.causal_lr, betas=(p.causal_beta1, p.causal_beta2), weight_decay=p.causal_weight_decay, eps=p.causal_eps
                )
                for _ in range(p.causal_steps):
                    opt.zero_grad()
                    logits = logits_of(norm, hidden + delta)
                    nll = F.cross_entropy(logits, y.reshape(-1), reduction="none").reshape(bsz, seq_len)
                    nll[mask].mean().backward()
                    opt.step()
            with torch.no_grad():
                logits = logits_of(norm, hidden + delta.detach())
                nll = F.cross_entropy(logits, y.reshape(-1), reduction="none").reshape(bsz, seq_len)
            for i, ws in enumerate(batch):
                totals.add(env.val, nll[i], x[i], y[i], ws, offsets[i], wlens[i])


def eval_slot(base_model, env, params: SlotParams, seq_len: int, record=None) -> tuple[float, float]:
    """(val_loss, val_bpb) of SLOT over the sliding windows of ``seq_len``; ``record(ws, s, nll)`` (optional)
    sees each window's scored NLLs (float64)."""
    total = env.val.tokens.numel() - 1
    mine = rank_share(window_starts(total, seq_len, params.stride), env.rank, env.world_size)
    totals = ScoreTotals(env.device, record)
    was_training = base_model.training
    base_model.eval()
    try:
        run = _eval_scored if params.variant == "scored" else _eval_causal
        run(base_model, env, params, seq_len, total, mine, totals)
    finally:
        base_model.train(was_training)
    totals.all_reduce()
    return totals.result()


class Slot:
    def __init__(self, params: SlotParams, train_seq_len: int) -> None:
        self.params = params
        window_params = SlidingWindowParams(
            eval_seq_len=params.eval_seq_len,
            stride=params.stride,
            batch_seqs=params.batch_seqs,
            roundtrip_label=params.roundtrip_label,
            label=params.sliding_label,
        )
        self.window = SlidingWindow(window_params, train_seq_len)
        self.eval_seq_len = self.window.eval_seq_len
        self.label = params.label or ("final_slot" if params.variant == "scored" else "final_causal_slot")
        self.reason = {"scored": SCORED_REASON, "causal": CAUSAL_REASON, "pr1333": PR1333_REASON}[params.variant]
        self.compliant = params.variant == "causal"

    def evaluate(self, model, env, quant: str, comp: str):
        p = self.params
        results = self.window.evaluate(model, env, quant, comp)
        base_model = env.base_model if env.base_model is not None else model
        t0 = time.perf_counter()
        loss, bpb = eval_slot(base_model, env, p, self.eval_seq_len)
        if p.variant == "scored":
            note = f"steps:{p.steps} lr:{p.lr}"
        else:
            note = f"variant:{p.variant} steps:{p.causal_steps} lr:{p.causal_lr}"
        results.append(FinalResult(self.label.format(quant=quant, comp=comp), loss, bpb, 1000.0 * (time.perf_counter() - t0), note))
        return results

    def reported_lines(self, quant: str, comp: str) -> list[str]:
        return [*self.window.reported_lines(quant, comp), self.label.format(quant=quant, comp=comp)]

    def compliance_for(self, line_name: str) -> Compliance:
        """The rule check of one reported line (``line_name`` as logged, with or without ``_exact``)."""
        if matches_label(self.label, line_name):
            return Compliance(line_name, self.compliant, self.reason)
        try:
            return self.window.compliance_for(line_name)
        except KeyError:
            raise KeyError(f"{line_name!r} is not a line the slot evaluator reports") from None


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="slot",
            slot="evaluator",
            params=SlotParams,
            build=lambda params, ctx: Slot(params, ctx.data.train_seq_len),
            summary="round trip, sliding window, then SLOT: a per-batch hidden offset (and logit bias) fitted at eval "
            "time (PR #1319 as it ran, not within the rules; or PR #1333's causal form)",
            source="https://github.com/openai/parameter-golf/pull/1319",
            example='[evaluator]\nuse = "slot"\nvariant = "causal"\neval_seq_len = 512\nstride = 64\ncausal_steps = 8\ncausal_lr = 0.005',
        )
    )
