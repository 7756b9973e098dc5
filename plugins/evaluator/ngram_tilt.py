"""Causal n-gram token tilt on the score-first TTT pass (record #1514, T18): the prefix-token expert only.

From record #1514 (``records/track_10min_16mb/2026-04-09_A2_Muon097_3Seed``, val_bpb 1.0798): ``ngram_tilt.py``
wraps PR #1420's C++ ``ContextMixer`` (``ngram/fused_expert_kernel.cpp``) and ``eval_val_sliding_ttt`` applies
``NgramTiltState.tilt_nll`` to every scored window of the score-first TTT pass (``NGRAM_TILT_ENABLED=1``). This
module is that evaluator with the kernel's token expert transcribed to torch (no compiled helper):

* **Hints** (kernel ``get_hints_batch``, ``token_hint``/``token_update``, ``OpenTable.update``): for each
  position ``p >= 1`` of the validation stream and each active order ``o`` in ``8..16`` (every
  ``order_stride``-th from 8), the context key is the kernel's ``compute_hashes``:
  ``h_o(p) = XOR_{k<o} tokens[p-1-k] * PRIMES[k]``. Each context keeps ``count`` (positions ``q < p`` with
  that key), and a leader token with ``best_count``: the token ``tokens[q]`` replaces the leader when its pair
  count (key ``(h * 1000003) ^ (tok * PRIMES[o])``) strictly exceeds ``best_count``; the leader's own occurrences
  add one. So ``best_count`` is the running maximum of the pair counts and the leader is the token that last
  raised it. The hint for ``p`` comes from the highest order whose context exists with
  ``conf = best_count / count >= threshold * token_threshold_scale`` and ``count >= min_count`` (orders 8-10:
  0.70, 3; 11-13: 0.60, 2; 14-16: 0.50, 2), with ``beta = base_beta * conf``; otherwise no hint. The state is
  read before the update with ``tokens[p]``: score before update. Computed here for all orders at once by
  sorting keys (exact counts with the kernel's own 64-bit keys, so its hash collisions are reproduced).
* **Tilt** (``NgramTiltState.tilt_nll``): ``p_tilt(t) = p(t) exp(beta 1[t = hint]) / Z`` with
  ``Z = 1 + p_hint (e^beta - 1)``, i.e. ``nll' = nll + has_hint (log Z - beta 1[target = hint])``, in float64
  from the float32 logits, ``p_hint`` clamped to [0, 1]. A normalised distribution over the whole vocabulary.

Compliance: the token expert reads only already-scored tokens. The kernel's two other experts, within-word
(``NGRAM_WITHIN_BETA``) and word-start (``NGRAM_WORD_BETA``), gate on and segment by word-boundary flags and
leaked the target in PR #1420; #1514 ran them with beta 0. Here they do not exist: a stack that sets
``within_beta`` or ``word_beta`` to anything but 0 is refused by ``pgolf validate``/``pgolf run``, naming the key.

Where this differs from the record: (1) #1514 still computed the within/word hints at beta 0, and its
``agree_bonus`` (0.1) added 0.1 to the token expert's beta when one of them agreed, or made a hint of beta 0.1
when the two agreed without the token expert; without those experts ``agree_bonus`` has nothing to act on and
is not offered. (2) The kernel's open-addressing tables (``2^open_table_bits`` slots, 16 probes) drop a
context or pair when 16 probes find no slot, and ``best_count`` is a ``uint16`` that wraps past 65535; counts
here are exact (where two contexts share a pair key, both count it together, but the leader's own occurrence
adds 1 in the kernel and takes the shared count here). On the tests' streams and on 194k tokens of FineWeb
SP8192 the hints and betas are bit-identical to the compiled kernel's. (3) The TTT pass is pgolf's
``score_first_ttt``: its windows, not #1514's ``ws + seq_len - stride < total`` ones; the TTT defaults here are
#1514's (lr 0.005, momentum 0.9 without Nesterov, no floor, no frozen blocks). ``epochs = 0`` gives the tilt on
a plain sliding window.
"""

from __future__ import annotations

import time

import attrs
import torch
from torch import Tensor

from pgolf_core.compliance import matches_label
from pgolf_core.config.fields import non_negative, param, positive
from pgolf_core.contracts import Compliance, FinalResult
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.plugins.evaluator.ttt import ScoreFirstTTT, ScoreFirstTTTParams, eval_score_first_ttt

PRIMES = (
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319, 2490389,
    2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
)  # fused_expert_kernel.cpp PRIMES
PAIR_MIX = 1000003
OPEN_MIN, OPEN_MAX = 8, 16


def order_config(order: int, scale: float) -> tuple[float, int]:
    """(confidence threshold, minimum count) of an order: the kernel's ``cfg_``."""
    if order <= 10:
        return 0.70 * scale, 3
    if order <= 13:
        return 0.60 * scale, 2
    return 0.50 * scale, 2


def _refused(expert: str):
    def check(instance, attribute: attrs.Attribute, value: float) -> None:
        if value != 0.0:
            raise ValueError(
                f"{attribute.name} = {value!r} enables the {expert} expert, which reads word-boundary flags of the token it "
                "scores (PR #1420's leak; #1514 ran it at 0): refused, only the prefix-token expert is within the rules (issue #1017 C1)"
            )

    return check


@attrs.define(frozen=True, kw_only=True)
class NgramTiltParams(ScoreFirstTTTParams):
    # #1514's TTT settings (its Hyperparameters' defaults): SGD lr 0.005, momentum 0.9 without Nesterov, no floor, no frozen blocks
    lr: float = param(0.005, help="SGD learning rate at the first chunk (cosine over the chunks)", env="TTT_LR", validator=non_negative)
    nesterov: bool = param(False, help="Nesterov momentum (#1514: off)", env="TTT_NESTEROV")
    lr_floor: float = param(0.0, help="lower bound of the cosine as a fraction of lr; 0: none (#1514)", env="TTT_LR_FLOOR", validator=non_negative)
    freeze_blocks: int = param(0, help="blocks 0..freeze_blocks-1 are not trained (#1514: 0)", env="TTT_FREEZE_BLOCKS", validator=non_negative)
    base_beta: float = param(2.0, help="tilt strength of the token expert: beta = base_beta * confidence", unit="nats", env="NGRAM_BASE_BETA")
    order_stride: int = param(2, help="active context orders 8, 8+stride, ... up to 16 (orders are token counts)", env="NGRAM_ORDER_STRIDE", validator=positive)
    token_threshold_scale: float = param(1.0, help="multiplies the per-order confidence thresholds (0.70, 0.60, 0.50)", validator=positive)
    within_beta: float = param(0.0, help="within-word expert (refused unless 0: it leaks the target)", unit="nats", env="NGRAM_WITHIN_BETA", validator=_refused("within-word"))
    word_beta: float = param(0.0, help="word-start expert (refused unless 0: it leaks the target)", unit="nats", env="NGRAM_WORD_BETA", validator=_refused("word-start"))
    label: str = param("final_{quant}_ngram_tilt", help="name of the tilted score-first TTT line (#1514 logs it as legal_ttt)")


def context_keys(tokens: Tensor, order: int) -> Tensor:
    """``h_order(p)`` for every position (int64 with the kernel's uint64 bits; only ``p >= order`` is used)."""
    t = tokens.to(torch.int64)
    h = torch.zeros_like(t)
    for k in range(order):
        h[k + 1 :] ^= t[: t.numel() - k - 1] * PRIMES[k % len(PRIMES)]
    return h


def _occurrence(keys: Tensor) -> tuple[Tensor, Tensor]:
    """For each element: how many earlier elements share its key, and the index (in ``order``) where its group starts;
    plus ``order``, the stable sort by key."""
    order = torch.sort(keys, stable=True).indices
    sk = keys[order]
    idx = torch.arange(keys.numel(), device=keys.device)
    first = torch.ones_like(sk, dtype=torch.bool)
    first[1:] = sk[1:] != sk[:-1]
    start = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 0).values
    rank = torch.empty_like(idx)
    rank[order] = idx - start
    return rank, order, start


def order_hints(tokens: Tensor, order: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each position p: (leader token, best_count, count) of context ``h_order(p)`` over positions q < p, read
    before p's own update; count 0 where the context is new or p < order."""
    n = tokens.numel()
    leader = torch.full((n,), -1, dtype=torch.int64, device=tokens.device)
    best = torch.zeros(n, dtype=torch.int64, device=tokens.device)
    count = torch.zeros(n, dtype=torch.int64, device=tokens.device)
    if n <= order:
        return leader, best, count
    tok = tokens.to(torch.int64)[order:]
    ctx = context_keys(tokens, order)[order:]
    pair = (ctx * PAIR_MIX) ^ (tok * PRIMES[order % len(PRIMES)])
    pair_rank, _, _ = _occurrence(pair)
    pc = pair_rank + 1  # the pair's count after this position's update
    ctx_rank, srt, start = _occurrence(ctx)
    m = tok.numel()
    idx = torch.arange(m, device=tokens.device)
    group = torch.cumsum((idx == start).to(torch.int64), 0)  # increasing group id along the sorted order
    pcs = pc[srt]
    cm = torch.cummax(group * (m + 1) + pcs, 0).values - group * (m + 1)  # running max of pair counts per context
    prev = torch.zeros_like(cm)
    prev[1:] = cm[:-1]
    prev[idx == start] = 0
    raised = pcs > prev  # the leader becomes this token
    last = torch.cummax(torch.where(raised, idx, torch.zeros_like(idx)), 0).values
    lead_sorted = tok[srt][last]
    # position p reads the state after the previous element of its context group
    has = idx != start
    before = (idx - 1).clamp(min=0)
    lead_p = torch.where(has, lead_sorted[before], torch.full_like(idx, -1))
    best_p = torch.where(has, cm[before], torch.zeros_like(idx))
    out_l, out_b, out_c = torch.empty_like(idx), torch.empty_like(idx), torch.empty_like(idx)
    out_l[srt], out_b[srt], out_c[srt] = lead_p, best_p, ctx_rank[srt]
    leader[order:], best[order:], count[order:] = out_l, out_b, out_c
    return leader, best, count


def token_hints(tokens: Tensor, base_beta: float = 2.0, order_stride: int = 2, token_threshold_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(hint int64, beta float64) for every position of ``tokens``: the hint for ``tokens[p]`` from ``tokens[:p]``,
    -1 and 0.0 where there is none (position 0 always)."""
    n = tokens.numel()
    hints = torch.full((n,), -1, dtype=torch.int64, device=tokens.device)
    betas = torch.zeros(n, dtype=torch.float64, device=tokens.device)
    for order in range(OPEN_MIN, OPEN_MAX + 1):  # ascending: a higher qualifying order overwrites a lower one
        if (order - OPEN_MIN) % order_stride:
            continue
        threshold, min_count = order_config(order, token_threshold_scale)
        leader, best, count = order_hints(tokens, order)
        conf = best.to(torch.float64) / count.clamp(min=1).to(torch.float64)
        ok = (count > 0) & (conf >= threshold) & (count >= min_count)
        hints = torch.where(ok, leader, hints)
        betas = torch.where(ok, base_beta * conf, betas)
    return hints, betas


def tilt_nll(nll: Tensor, logits: Tensor, targets: Tensor, hints: Tensor, betas: Tensor) -> Tensor:
    """``NgramTiltState.tilt_nll``: the NLL (float64) under ``p(t) exp(beta 1[t = hint]) / Z`` at each position."""
    has_hint = (hints >= 0).to(torch.float64)
    logit_tgt = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    logit_hint = logits.gather(-1, hints.clamp(min=0).unsqueeze(-1)).squeeze(-1).to(torch.float64)
    lse = nll + logit_tgt
    p_hint = (logit_hint - lse).exp().clamp(0.0, 1.0)
    z = 1.0 + p_hint * (betas.exp() - 1.0)
    is_hit = (targets == hints).to(torch.float64)
    return nll + has_hint * (z.log() - betas * is_hit)


TILT_REASON = (
    "score-first TTT (each chunk scored before training on it) with a tilt whose hint for a token comes from n-gram "
    "counts of the tokens before it only, read before that token updates them; the tilted distribution is normalised "
    "over the whole vocabulary (issue #1017 C1-C3; record #1514, token expert only)"
)


class NgramTilt:
    def __init__(self, params: NgramTiltParams, train_seq_len: int) -> None:
        self.params = params
        self.ttt = ScoreFirstTTT(params, train_seq_len)
        self.eval_seq_len = self.ttt.eval_seq_len
        self.precompute_s = 0.0

    def hints(self, tokens: Tensor, device) -> tuple[Tensor, Tensor]:
        p = self.params
        t0 = time.perf_counter()
        hints, betas = token_hints(tokens.to(device=device, dtype=torch.int64), p.base_beta, p.order_stride, p.token_threshold_scale)
        self.precompute_s = time.perf_counter() - t0
        return hints, betas

    def evaluate(self, model, env, quant: str, comp: str):
        p = self.params
        results = self.ttt.window.evaluate(model, env, quant, comp)
        base_model = env.base_model if env.base_model is not None else model
        t0 = time.perf_counter()
        hints, betas = self.hints(env.val.tokens, env.device)
        hit = int((hints >= 0).sum())

        def adjust(nll, logits, targets, positions):
            return tilt_nll(nll, logits, targets, hints[positions], betas[positions])

        loss, bpb = eval_score_first_ttt(base_model, env, p, self.eval_seq_len, adjust=adjust)
        note = f"hints:{hit}/{max(env.val.tokens.numel() - 1, 1)} precompute:{self.precompute_s:.1f}s base_beta:{p.base_beta} epochs:{p.epochs}"
        results.append(FinalResult(p.label.format(quant=quant, comp=comp), loss, bpb, 1000.0 * (time.perf_counter() - t0), note))
        return results

    def reported_lines(self, quant: str, comp: str) -> list[str]:
        return [*self.ttt.window.reported_lines(quant, comp), self.params.label.format(quant=quant, comp=comp)]

    def compliance_for(self, line_name: str) -> Compliance:
        if matches_label(self.params.label, line_name):
            return Compliance(line_name, True, TILT_REASON)
        try:
            return self.ttt.window.compliance_for(line_name)
        except KeyError:
            raise KeyError(f"{line_name!r} is not a line the ngram_tilt evaluator reports") from None


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="ngram_tilt",
            slot="evaluator",
            params=NgramTiltParams,
            build=lambda params, ctx: NgramTilt(params, ctx.data.train_seq_len),
            summary="round trip, sliding window, then score-first TTT scored through a causal n-gram token tilt "
            "(prefix-token expert only; record #1514)",
            source="https://github.com/openai/parameter-golf/tree/main/records/track_10min_16mb/2026-04-09_A2_Muon097_3Seed",
            example='[evaluator]\nuse = "ngram_tilt"\neval_seq_len = 512\nepochs = 0\nbase_beta = 2.0\norder_stride = 2',
        )
    )
