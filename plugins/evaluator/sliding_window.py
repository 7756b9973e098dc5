"""Sliding-window evaluation: every validation token scored with (nearly) a full window of context.

From the #315 line of records (``eval_val_sliding``). Windows of ``eval_seq_len`` start every ``stride``
tokens; window ``ws`` scores its positions ``[s, wlen)`` with ``s = 0`` for the first window and
``max(wlen - stride, 0)`` after, so consecutive windows score consecutive ``stride``-token spans. Windows
clipped at the end of the split each re-score its last ``stride`` tokens: the reference does, so this does,
for the same number. Ranks take contiguous blocks of windows; batches of ``batch_seqs`` windows are
zero-padded on the right (after every scored position).

Reports two lines like the reference: the non-overlapping round trip at ``eval_seq_len``
(``final_int6_roundtrip``) and the sliding window (``final_int6_sliding_window``), the submission score.
``compliance_for(line)`` says why each line is within the rules. The window helpers here (starts, rank
split, batches, float64 totals) are shared by the evaluators built on these windows (``slot``,
``score_first_ttt``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import dataclasses

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pgolf_core.compliance import matches_label
from pgolf_core.contracts import Compliance, FinalResult
from pgolf_core.config.fields import non_negative, param, positive
from pgolf_core.evaluate import eval_val
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SlidingWindowParams:
    eval_seq_len: int = param(2048, help="window length; 0 uses data.train_seq_len", unit="tokens", env="EVAL_SEQ_LEN", validator=non_negative)
    stride: int = param(64, help="tokens between window starts (and scored per window)", unit="tokens", env="EVAL_STRIDE", validator=positive)
    batch_seqs: int = param(32, help="windows per forward pass", env="EVAL_BATCH_SEQS", validator=positive)
    roundtrip_label: str = param("final_{quant}_roundtrip", help="name of the non-overlapping round-trip line")
    label: str = param("final_{quant}_sliding_window", help="name of the sliding-window line (the submission score)")
    score_once: bool = param(
        False,
        help="the #1218 record's corrected windows: start only while ws + eval_seq_len - stride < total, score positions "
        "[eval_seq_len - stride, wlen) of each later window, so every token is scored once (False: the #315 line's windows, re-scoring the tail)",
    )


def window_starts(total_tokens: int, seq_len: int, stride: int, score_once: bool = False) -> list[int]:
    if score_once:  # PR #1218's fix: no window starts whose scored span would lie past the end
        return [ws for ws in range(0, total_tokens, stride) if ws + seq_len - stride < total_tokens]
    return [ws for ws in range(0, total_tokens, stride) if min(ws + seq_len, total_tokens) - ws >= 1]


def scored_offset(ws: int, wlen: int, stride: int, seq_len: int = 0) -> int:
    """First scored position of the window starting at ``ws``: 0 for the first window, else its last ``stride``
    (with ``seq_len``, the #1218 rule: ``seq_len - stride`` whatever the window's length, so a clipped last
    window scores only the tokens no earlier window scored)."""
    if ws == 0:
        return 0
    return seq_len - stride if seq_len else max(wlen - stride, 0)


def rank_share(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous block of ``items``, as the references split windows."""
    return items[(len(items) * rank) // world_size : (len(items) * (rank + 1)) // world_size]


def window_batch(tokens: Tensor, batch: list[int], seq_len: int, total: int, device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
    """Inputs and targets of the windows starting at ``batch``, zero-padded on the right to ``seq_len``."""
    bsz = len(batch)
    x = torch.zeros(bsz, seq_len, dtype=torch.int64, device=device)
    y = torch.zeros(bsz, seq_len, dtype=torch.int64, device=device)
    wlens = []
    for i, ws in enumerate(batch):
        end = min(ws + seq_len, total)
        wlen = end - ws
        wlens.append(wlen)
        chunk = tokens[ws : end + 1].to(dtype=torch.int64, device=device)
        x[i, :wlen] = chunk[:-1]
        y[i, :wlen] = chunk[1:]
    return x, y, wlens


class ScoreTotals:
    """NLL, token and byte sums in float64, the references' accumulators; ``record(ws, s, nll)`` (optional)
    sees each window's scored NLLs."""

    def __init__(self, device: torch.device, record: Callable[[int, int, Tensor], None] | None = None) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.token_count = torch.zeros((), device=device, dtype=torch.float64)
        self.byte_count = torch.zeros((), device=device, dtype=torch.float64)
        self.record = record

    def add(self, val, nll_row: Tensor, x_row: Tensor, y_row: Tensor, ws: int, s: int, wlen: int) -> None:
        scored = nll_row[s:wlen].to(torch.float64)
        self.loss_sum += scored.sum()
        self.token_count += float(wlen - s)
        tgt, prev = y_row[s:wlen], x_row[s:wlen]
        self.byte_count += val.target_bytes(prev, tgt, ws + s + 1).to(torch.float64).sum()
        if self.record is not None:
            self.record(ws, s, scored)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            for t in (self.loss_sum, self.token_count, self.byte_count):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def result(self) -> tuple[float, float]:
        val_loss = (self.loss_sum / self.token_count).item()
        return val_loss, val_loss / math.log(2.0) * (self.token_count.item() / self.byte_count.item())


def eval_sliding(base_model, env, seq_len: int, stride: int, batch_seqs: int, record=None, score_once: bool = False) -> tuple[float, float]:
    val = env.val
    tokens = val.tokens
    device = env.device
    total = tokens.numel() - 1
    mine = rank_share(window_starts(total, seq_len, stride, score_once), env.rank, env.world_size)
    once_len = seq_len if score_once else 0
    totals = ScoreTotals(device, record)
    logits_fn = env.compiled(base_model.logits)
    was_training = base_model.training
    base_model.eval()
    with torch.no_grad():
        for bi in range(0, len(mine), batch_seqs):
            batch = mine[bi : bi + batch_seqs]
            bsz = len(batch)
            x, y, wlens = window_batch(tokens, batch, seq_len, total, device)
            with env.autocast():
                logits = logits_fn(x)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none").reshape(bsz, seq_len)
            for i, ws in enumerate(batch):
                totals.add(val, nll[i], x[i], y[i], ws, scored_offset(ws, wlens[i], stride, once_len), wlens[i])
    totals.all_reduce()
    base_model.train(was_training)
    return totals.result()


ROUNDTRIP_COMPLIANCE = "scores each validation token once, after training, with the frozen model from preceding tokens only"
SLIDING_COMPLIANCE = (
    "each validation token is scored by the frozen model from preceding tokens only; overlapping windows add "
    "context, never later tokens"
)


class SlidingWindow:
    def __init__(self, params: SlidingWindowParams, train_seq_len: int) -> None:
        self.params = params
        self.eval_seq_len = params.eval_seq_len or train_seq_len
        if params.stride > self.eval_seq_len:
            raise ValueError(f"stride={params.stride} is larger than eval_seq_len={self.eval_seq_len}")

    def evaluate(self, model, env, quant: str, comp: str):
        p = self.params
        results = []
        t0 = time.perf_counter()
        loss, bpb = eval_val(model, dataclasses.replace(env, seq_len=self.eval_seq_len))
        results.append(FinalResult(p.roundtrip_label.format(quant=quant, comp=comp), loss, bpb, 1000.0 * (time.perf_counter() - t0)))
        if p.stride < self.eval_seq_len:
            t0 = time.perf_counter()
            loss, bpb = eval_sliding(env.base_model, env, self.eval_seq_len, p.stride, p.batch_seqs, score_once=p.score_once)
            results.append(FinalResult(p.label.format(quant=quant, comp=comp), loss, bpb, 1000.0 * (time.perf_counter() - t0), f"stride:{p.stride}"))
        return results

    def reported_lines(self, quant: str, comp: str) -> list[str]:
        """The final line names ``evaluate`` will log (``pgolf validate`` checks them against the rules)."""
        p = self.params
        lines = [p.roundtrip_label.format(quant=quant, comp=comp)]
        if p.stride < self.eval_seq_len:
            lines.append(p.label.format(quant=quant, comp=comp))
        return lines

    def compliance_for(self, line_name: str) -> Compliance:
        """The rule check of one reported line (``line_name`` as logged, with or without ``_exact``)."""
        if matches_label(self.params.roundtrip_label, line_name):
            return Compliance(line_name, True, ROUNDTRIP_COMPLIANCE)
        if matches_label(self.params.label, line_name):
            return Compliance(line_name, True, SLIDING_COMPLIANCE)
        raise KeyError(f"{line_name!r} is not a line the sliding_window evaluator reports")


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="sliding_window",
            slot="evaluator",
            params=SlidingWindowParams,
            build=lambda params, ctx: SlidingWindow(params, ctx.data.train_seq_len),
            summary="round trip at eval_seq_len, then overlapping windows scoring `stride` tokens each (#315 line)",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[evaluator]\nuse = "sliding_window"\neval_seq_len = 2048\nstride = 64',
        )
    )
