"""Score-first test-time training: score a chunk of the validation stream, then train on it, chunk by chunk.

From PR #1392's ``eval_val_sliding_ttt`` (present there but off in its run; the same design as merged PR #549).
Reports three lines, in order: the non-overlapping round trip at ``eval_seq_len`` (``final_{quant}_roundtrip``),
the sliding window (``final_{quant}_sliding_window``, the ``sliding_window`` evaluator's own code) and
``final_{quant}_ttt`` (#1392 logs it as ``legal_ttt``).

Windows are the sliding window's, except that windows shorter than ``stride`` are dropped (all but the one at
0). The stream is cut into ``ceil(P / chunk_tokens)`` chunks and each window belongs to the chunk of its first
scored position. For each chunk, in order:

1. score all its windows with the model as it stands (``no_grad``; batches of ``eval_batch_seqs`` windows, the
   ranks' contiguous shares), NLL summed in float64;
2. unless it is the last chunk, train on it: its whole ``eval_seq_len`` sequences (split across ranks),
   ``epochs`` passes in batches of ``batch_seqs`` sequences, mean cross-entropy, gradients averaged across
   ranks, clipped to ``grad_clip``, one SGD step each (momentum, Nesterov as set), at
   ``lr_c = lr (1 + cos(pi c / (C - 1))) / 2``, floored at ``lr_floor`` × ``lr`` when ``lr_floor > 0``.

Parameters whose name contains ``blocks.{i}.`` for ``i < freeze_blocks`` are not trained. The optimizer is
built once, so momentum carries over from chunk to chunk. Afterwards the model's weights, ``requires_grad``
flags and train/eval mode are restored.

Where this differs from #1392 on purpose: scoring runs under ``no_grad`` rather than ``inference_mode`` (same
numbers; tensors cached while scoring stay usable by the training step after it); windows and training
sequences are ``eval_seq_len`` long (#1392 uses ``train_seq_len``, equal in its run); #1392's switches that
are off by default (AdamW, difficulty-adaptive epochs, q-only, temperature, n-gram mixing) are left out.
"""

from __future__ import annotations

import math
import time

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pgolf_core.compliance import matches_label
from pgolf_core.contracts import Compliance, FinalResult
from pgolf_core.config.fields import non_negative, param, positive
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

TTT_REASON = (
    "each chunk is scored with the model as it stands before training on that chunk, and training uses only tokens "
    "already scored, so no token's score depends on an update made from it or from a later token (README FAQ: "
    "test-time training only on tokens already evaluated; issue #1017 conditions C1 and C3; merged PR #549)"
)


@attrs.define(frozen=True, kw_only=True)
class ScoreFirstTTTParams:
    eval_seq_len: int = param(2048, help="window and training-sequence length; 0 uses data.train_seq_len", unit="tokens", env="EVAL_SEQ_LEN", validator=non_negative)
    stride: int = param(64, help="tokens between window starts (and scored per window)", unit="tokens", env="EVAL_STRIDE", validator=positive)
    eval_batch_seqs: int = param(32, help="windows per scoring forward pass (also for the sliding-window line)", env="EVAL_BATCH_SEQS", validator=positive)
    chunk_tokens: int = param(32768, help="tokens per chunk: score the chunk, then train on it", unit="tokens", env="TTT_CHUNK_TOKENS", validator=positive)
    epochs: int = param(3, help="training passes over each chunk (0: score only)", env="TTT_EPOCHS", validator=non_negative)
    batch_seqs: int = param(32, help="training sequences per SGD step", env="TTT_BATCH_SEQS", validator=positive)
    lr: float = param(0.002, help="SGD learning rate at the first chunk (cosine over the chunks)", env="TTT_LR", validator=non_negative)
    momentum: float = param(0.9, help="SGD momentum", env="TTT_MOMENTUM", validator=non_negative)
    nesterov: bool = param(True, help="Nesterov momentum (#1392: on; #549: off)", env="TTT_NESTEROV")
    grad_clip: float = param(1.0, help="gradient-norm clip of each step", env="TTT_GRAD_CLIP", validator=positive)
    lr_floor: float = param(0.1, help="lower bound of the cosine as a fraction of lr; 0: none (#549)", env="TTT_LR_FLOOR", validator=non_negative)
    freeze_blocks: int = param(2, help="blocks 0..freeze_blocks-1 are not trained (#1392: 2; #549: 0)", env="TTT_FREEZE_BLOCKS", validator=non_negative)
    score_once: bool = param(
        False,
        help="the #1218 line's corrected windows for the sliding-window line and the TTT scoring (#1394/#1493): start only while "
        "ws + eval_seq_len - stride < total, score from eval_seq_len - stride, so every token is scored once (False: #1392's windows)",
    )
    roundtrip_label: str = param("final_{quant}_roundtrip", help="name of the non-overlapping round-trip line")
    sliding_label: str = param("final_{quant}_sliding_window", help="name of the sliding-window line")
    label: str = param("final_{quant}_ttt", help="name of the test-time-training line")


def ttt_window_starts(total_tokens: int, seq_len: int, stride: int, score_once: bool = False) -> list[int]:
    """The sliding window's starts without the windows shorter than ``stride`` (except the one at 0); with
    ``score_once``, #1493's list: ``ws + seq_len - stride < total`` (the corrected sliding window's)."""
    if score_once:
        return window_starts(total_tokens, seq_len, stride, score_once=True)
    return [ws for ws in range(0, total_tokens, stride) if min(ws + seq_len, total_tokens) - ws >= stride or ws == 0]


def chunk_windows(total_tokens: int, seq_len: int, stride: int, chunk_tokens: int, score_once: bool = False) -> list[list[int]]:
    """Window starts per chunk; a window belongs to the chunk of its first scored position."""
    n_chunks = (total_tokens + chunk_tokens - 1) // chunk_tokens
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    once_len = seq_len if score_once else 0
    for ws in ttt_window_starts(total_tokens, seq_len, stride, score_once):
        wlen = min(ws + seq_len, total_tokens) - ws
        chunks[min((ws + scored_offset(ws, wlen, stride, once_len)) // chunk_tokens, n_chunks - 1)].append(ws)
    return chunks


def chunk_lr(chunk: int, n_chunks: int, lr: float, lr_floor: float) -> float:
    value = lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))
    return max(value, lr * lr_floor) if lr_floor > 0 else value


def trainable(model: nn.Module, freeze_blocks: int) -> list[tuple[str, nn.Parameter]]:
    """The parameters TTT trains: all but those of blocks ``0..freeze_blocks-1`` (by ``blocks.{i}.`` in the name)."""
    frozen = range(min(freeze_blocks, len(model.blocks)))
    return [(n, p) for n, p in model.named_parameters() if not any(f"blocks.{i}." in n for i in frozen)]


def _average_grads(params: list[nn.Parameter], world_size: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    if dist.get_backend() == "nccl":
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    else:  # gloo has no AVG
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
    for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(avg)


def eval_score_first_ttt(base_model, env, params: ScoreFirstTTTParams, seq_len: int, record=None, adjust=None) -> tuple[float, float]:
    """(val_loss, val_bpb) with score-first TTT; ``record(ws, s, nll)`` (optional) sees each window's scored
    NLLs (float64). ``adjust(nll, logits, targets, positions) -> nll`` (optional) replaces the scored NLLs of a
    window (float64 ``(n,)``, its float32 logits ``(n, V)``, targets and their indices in the validation stream)
    before they are summed: an eval-time mixture on the scoring pass. The model comes back with the weights,
    flags and mode it had."""
    p = params
    val, tokens, device = env.val, env.val.tokens, env.device
    total = tokens.numel() - 1
    score_once = getattr(p, "score_once", False)
    once_len = seq_len if score_once else 0
    chunks = chunk_windows(total, seq_len, p.stride, p.chunk_tokens, score_once)
    n_chunks = len(chunks)
    distributed = dist.is_available() and dist.is_initialized() and env.world_size > 1
    saved = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    flags = [(q, q.requires_grad) for q in base_model.parameters()]
    was_training = base_model.training
    train_ids = {id(q) for _, q in trainable(base_model, p.freeze_blocks)}
    weights = [q for q in base_model.parameters() if id(q) in train_ids]
    totals = ScoreTotals(device, record)
    try:
        for q in base_model.parameters():
            q.requires_grad_(id(q) in train_ids)
        opt = torch.optim.SGD(weights, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov)
        logits_fn = env.compiled(base_model.logits)
        for c, windows in enumerate(chunks):
            if not windows:
                continue
            mine = rank_share(windows, env.rank, env.world_size)
            base_model.eval()
            with torch.no_grad():
                for bi in range(0, len(mine), p.eval_batch_seqs):
                    batch = mine[bi : bi + p.eval_batch_seqs]
                    x, y, wlens = window_batch(tokens, batch, seq_len, total, device)
                    with env.autocast():
                        logits = logits_fn(x)
                    logits = logits.reshape(len(batch), seq_len, -1).float()
                    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").reshape(len(batch), seq_len)
                    for i, ws in enumerate(batch):
                        s = scored_offset(ws, wlens[i], p.stride, once_len)
                        row = nll[i]
                        if adjust is not None and wlens[i] > s:
                            row = row.to(torch.float64).clone()
                            positions = torch.arange(ws + s + 1, ws + wlens[i] + 1, device=device, dtype=torch.int64)
                            row[s : wlens[i]] = adjust(row[s : wlens[i]], logits[i, s : wlens[i]], y[i, s : wlens[i]], positions)
                        totals.add(val, row, x[i], y[i], ws, s, wlens[i])
            if c == n_chunks - 1 or p.epochs <= 0:
                continue
            chunk_start, chunk_end = c * p.chunk_tokens, min((c + 1) * p.chunk_tokens, total)
            n_seqs = (chunk_end - chunk_start) // seq_len
            if n_seqs <= 0:
                continue
            base_model.train()
            for group in opt.param_groups:
                group["lr"] = chunk_lr(c, n_chunks, p.lr, p.lr_floor)
            first = n_seqs * env.rank // env.world_size
            count = n_seqs * (env.rank + 1) // env.world_size - first
            for _ in range(p.epochs):
                for bs in range(0, count, p.batch_seqs):
                    be = min(bs + p.batch_seqs, count)
                    start = chunk_start + (first + bs) * seq_len
                    end = chunk_start + (first + be) * seq_len + 1
                    if end > tokens.numel():
                        continue
                    local = tokens[start:end].to(device=device, dtype=torch.int64)
                    x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
                    opt.zero_grad(set_to_none=True)
                    with env.autocast():
                        loss = F.cross_entropy(base_model.logits(x).float(), y.reshape(-1), reduction="mean")
                    loss.backward()
                    if distributed:
                        _average_grads(weights, env.world_size)
                    torch.nn.utils.clip_grad_norm_(weights, p.grad_clip)
                    opt.step()
    finally:
        with torch.no_grad():
            base_model.load_state_dict(saved)
        for q, flag in flags:
            q.requires_grad_(flag)
            q.grad = None
        base_model.train(was_training)
    totals.all_reduce()
    return totals.result()


class ScoreFirstTTT:

    def __init__(self, params: ScoreFirstTTTParams, train_seq_len: int) -> None:
        if params.nesterov and params.momentum <= 0:
            raise ValueError("nesterov = true needs momentum > 0")
        self.params = params
        window_params = SlidingWindowParams(
            eval_seq_len=params.eval_seq_len,
            stride=params.stride,
            batch_seqs=params.eval_batch_seqs,
            roundtrip_label=params.roundtrip_label,
            label=params.sliding_label,
            score_once=params.score_once,
        )
        self.window = SlidingWindow(window_params, train_seq_len)
        self.eval_seq_len = self.window.eval_seq_len

    def evaluate(self, model, env, quant: str, comp: str):
        p = self.params
        results = self.window.evaluate(model, env, quant, comp)
        base_model = env.base_model if env.base_model is not None else model
        t0 = time.perf_counter()
        loss, bpb = eval_score_first_ttt(base_model, env, p, self.eval_seq_len)
        note = f"chunk_tokens:{p.chunk_tokens} epochs:{p.epochs} lr:{p.lr} freeze_blocks:{p.freeze_blocks}"
        results.append(FinalResult(p.label.format(quant=quant, comp=comp), loss, bpb, 1000.0 * (time.perf_counter() - t0), note))
        return results

    def reported_lines(self, quant: str, comp: str) -> list[str]:
        return [*self.window.reported_lines(quant, comp), self.params.label.format(quant=quant, comp=comp)]

    def compliance_for(self, line_name: str) -> Compliance:
        """The rule check of one reported line (``line_name`` as logged, with or without ``_exact``)."""
        if matches_label(self.params.label, line_name):
            return Compliance(line_name, True, TTT_REASON)
        try:
            return self.window.compliance_for(line_name)
        except KeyError:
            raise KeyError(f"{line_name!r} is not a line the score_first_ttt evaluator reports") from None


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="score_first_ttt",
            slot="evaluator",
            params=ScoreFirstTTTParams,
            build=lambda params, ctx: ScoreFirstTTT(params, ctx.data.train_seq_len),
            summary="round trip, sliding window, then score-first TTT: score each 32K-token chunk, then SGD on it "
            "(PR #1392's legal TTT, merged PR #549's design)",
            source="https://github.com/openai/parameter-golf/pull/549",
            example='[evaluator]\nuse = "score_first_ttt"\neval_seq_len = 512\nchunk_tokens = 32768\nepochs = 3\nlr = 0.002\nfreeze_blocks = 2',
        )
    )
