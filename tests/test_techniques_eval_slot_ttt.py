"""The SLOT and score-first TTT evaluators: their math on tiny tensors, causality flip tests, and per-line compliance."""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import pairwise

import attrs
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_stack

from pgolf_core.evaluate import EvalEnv, ValData
from pgolf.plugins.tokenizer.sentencepiece import PieceBytes
from pgolf_core.model.gpt import build_model
from pgolf.plugins.evaluator.full_val import FullVal, FullValParams
from pgolf.plugins.evaluator.sliding_window import (
    SlidingWindow,
    SlidingWindowParams,
    eval_sliding,
    matches_label,
)
from pgolf.plugins.evaluator.slot import (
    SCORED_REASON,
    Slot,
    SlotParams,
    context_lengths,
    eval_slot,
    fit_scored,
    output_weight,
    slot_init,
    slot_logits,
    slot_lr,
)
from pgolf.plugins.evaluator.ttt import (
    ScoreFirstTTT,
    ScoreFirstTTTParams,
    chunk_lr,
    chunk_windows,
    eval_score_first_ttt,
    trainable,
    ttt_window_starts,
)

VOCAB = 1024


@pytest.fixture
def model(registry):
    """The tiny baseline GPT with weights spread out, so that predictions depend on the context."""
    torch.manual_seed(0)
    m, _ = build_model(tiny_stack(registry), registry)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "tok_emb" in name else 0.05))
    return m


def make_env(model, tokens: torch.Tensor, seq_len: int = 32) -> EvalEnv:
    gen = torch.Generator().manual_seed(5)
    val = ValData(
        tokens,
        PieceBytes(
            torch.randint(1, 4, (VOCAB,), generator=gen).to(torch.int16),
            torch.rand(VOCAB, generator=gen) < 0.3,
            torch.zeros(VOCAB, dtype=torch.bool),
        ),
    )
    return EvalEnv(val, seq_len, 4 * seq_len, 1, 0, 1, torch.device("cpu"), base_model=model)


def stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n + 1,), generator=torch.Generator().manual_seed(seed))


def per_target(fn) -> dict[int, list[float]]:
    """Run ``fn(record)`` and collect every scored NLL by the index of the token it scores."""
    out: dict[int, list[float]] = defaultdict(list)

    def record(ws, s, nll):
        for k, v in enumerate(nll.tolist()):
            out[ws + s + k + 1].append(v)

    fn(record)
    return out


# -- SLOT (PR #1319) math --------------------------------------------------------------------------------------
def test_slot_lr_is_a_cosine_from_lr_towards_lr_min():
    assert slot_lr(0, 64, 0.01, 0.001) == pytest.approx(0.01)
    assert slot_lr(32, 64, 0.01, 0.001) == pytest.approx(0.0055)
    assert slot_lr(64, 64, 0.01, 0.001) == pytest.approx(0.001)  # the endpoint, never taken
    lrs = [slot_lr(t, 64, 0.01, 0.001) for t in range(64)]
    assert all(a > b for a, b in pairwise(lrs)) and lrs[-1] > 0.001


def test_slot_warm_start_is_085_of_the_previous_batch_when_sizes_match():
    prev = (torch.randn(3, 1, 8), torch.randn(3, 1, 16))
    delta, bias = slot_init(prev, 3, 8, 16, 0.85, torch.device("cpu"))
    torch.testing.assert_close(delta, 0.85 * prev[0])
    torch.testing.assert_close(bias, 0.85 * prev[1])
    assert delta.requires_grad and bias.requires_grad and delta.is_leaf and delta.data_ptr() != prev[0].data_ptr()
    for args in ((prev, 2, 0.85), (None, 3, 0.85), (prev, 3, 0.0)):  # other batch size, first batch, warm start off
        d, b = slot_init(args[0], args[1], 8, 16, args[2], torch.device("cpu"))
        assert d.shape == (args[1], 1, 8) and b.shape == (args[1], 1, 16)
        assert not d.any() and not b.any() and d.dtype == b.dtype == torch.float32


def test_slot_logits_and_one_batch_of_optimisation():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 16, 8), torch.randn(32, 8)
    targets = torch.randint(0, 32, (2, 16))
    mask = torch.zeros(2, 16)
    mask[0, 12:] = 1.0
    mask[1, 10:] = 1.0
    delta, bias = slot_init(None, 2, 8, 32, 0.85, torch.device("cpu"))
    want = 30.0 * torch.tanh(((hidden + 0.1) @ weight.T + 0.2) / 30.0)
    torch.testing.assert_close(slot_logits(hidden, weight, 30.0, delta.detach() + 0.1, bias.detach() + 0.2), want)

    def masked_loss():
        with torch.no_grad():
            nll = F.cross_entropy(slot_logits(hidden, weight, 30.0, delta, bias).reshape(-1, 32), targets.reshape(-1), reduction="none")
        return float((nll.reshape(2, 16) * mask).sum() / mask.sum())

    frozen = masked_loss()
    fit_scored(hidden, weight, 30.0, targets, mask, delta, bias, steps=16, lr=0.05, lr_min=0.005)
    assert masked_loss() < frozen - 0.1
    assert delta.abs().sum() > 0 and bias.abs().sum() > 0


def reference_1319(model, tokens, seq_len, stride, batch_seqs, steps, lr, lr_min, alpha, val):
    """PR #1319's ``eval_val_sliding_slot`` transcribed (one rank, CPU), to compare numbers with."""
    total = tokens.numel() - 1
    starts = [ws for ws in range(0, total, stride) if min(ws + seq_len, total) - ws >= 1]
    loss_sum = torch.zeros((), dtype=torch.float64)
    tok = torch.zeros((), dtype=torch.float64)
    byt = torch.zeros((), dtype=torch.float64)
    proj_w = model.embedding.tok_emb.weight.detach().float()
    softcap = model.head.logit_softcap
    prev_delta = prev_bias = None
    for bi in range(0, len(starts), batch_seqs):
        batch = starts[bi : bi + batch_seqs]
        bsz = len(batch)
        xb = torch.zeros(bsz, seq_len, dtype=torch.int64)
        yb = torch.zeros(bsz, seq_len, dtype=torch.int64)
        wlens = []
        for i, ws in enumerate(batch):
            end = min(ws + seq_len, total)
            wlens.append(end - ws)
            xb[i, : end - ws] = tokens[ws:end]
            yb[i, : end - ws] = tokens[ws + 1 : end + 1]
        with torch.no_grad():
            hid = model.hidden(xb).float()
        mask = torch.zeros(bsz, seq_len)
        for i, ws in enumerate(batch):
            mask[i, (0 if ws == 0 else max(wlens[i] - stride, 0)) : wlens[i]] = 1.0
        valid = mask.sum()
        if alpha > 0 and prev_delta is not None and prev_delta.size(0) == bsz:
            delta = (alpha * prev_delta.clone()).requires_grad_(True)
            lbias = (alpha * prev_bias.clone()).requires_grad_(True)
        else:
            delta = torch.zeros(bsz, 1, hid.size(-1), requires_grad=True)
            lbias = torch.zeros(bsz, 1, proj_w.size(0), requires_grad=True)
        opt = torch.optim.AdamW([delta, lbias], lr=lr)
        for t in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / steps))
            logits = softcap * torch.tanh((F.linear(hid + delta, proj_w) + lbias) / softcap)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="none").reshape(bsz, seq_len)
            loss = (nll * mask).sum() / valid
            opt.zero_grad()
            loss.backward()
            opt.step()
        prev_delta, prev_bias = delta.detach(), lbias.detach()
        with torch.no_grad():
            logits = softcap * torch.tanh((F.linear(hid + delta, proj_w) + lbias) / softcap)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="none").reshape(bsz, seq_len)
        for i, ws in enumerate(batch):
            s = 0 if ws == 0 else max(wlens[i] - stride, 0)
            loss_sum += nll[i, s : wlens[i]].to(torch.float64).sum()
            tok += float(wlens[i] - s)
            tgt, prev = yb[i, s : wlens[i]], xb[i, s : wlens[i]]
            nb = val.bytes.base_bytes[tgt].to(torch.float64)
            nb += (val.bytes.has_leading_space[tgt] & ~val.bytes.is_boundary[prev]).to(torch.float64)
            byt += nb.sum()
    vl = (loss_sum / tok).item()
    return vl, vl / math.log(2.0) * (tok.item() / byt.item())


def test_scored_slot_reproduces_pr1319_step_for_step(model):
    tokens = stream(100)  # 13 windows of 32 at stride 8: batches of 4, 4, 4, 1 (the last starts from zeros)
    env = make_env(model, tokens)
    p = SlotParams(variant="scored", eval_seq_len=32, stride=8, batch_seqs=4, steps=3, lr=0.01, lr_min=0.001, warmstart=0.85)
    got = eval_slot(model, env, p, 32)
    want = reference_1319(model, tokens, 32, 8, 4, 3, 0.01, 0.001, 0.85, env.val)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    frozen = eval_sliding(model, env, 32, 8, 4)
    assert got[0] < frozen[0]  # fitting the scored targets lowers their loss
    assert eval_slot(model, env, attrs.evolve(p, steps=0, warmstart=0.0), 32) == pytest.approx(frozen, rel=1e-6)


# -- causality: the flip test of PR #1240 -----------------------------------------------------------------------
FLIP = 70  # scored by the window at 40 (positions 24..31 -> tokens 65..72), second of the batch [32, 40, 48, 56]


@pytest.mark.parametrize("variant, causal", [("scored", False), ("causal", True), ("pr1333", False)])
def test_flip_test_changes_earlier_scores_only_for_non_causal_slot(model, variant, causal):
    tokens = stream(160)
    flipped = tokens.clone()
    flipped[FLIP] = (tokens[FLIP] + 1) % VOCAB
    p = SlotParams(variant=variant, eval_seq_len=32, stride=8, batch_seqs=4, steps=8, lr=0.05, causal_steps=8, causal_lr=0.05)
    runs = [per_target(lambda rec, t=t: eval_slot(model, make_env(model, t), p, 32, record=rec)) for t in (tokens, flipped)]
    earlier = [k for k in runs[0] if k < FLIP]
    assert set(range(1, FLIP)) <= set(earlier)  # every earlier token is scored
    same = all(runs[0][k] == runs[1][k] for k in earlier)
    assert same is causal
    if not causal:  # the scored tokens just before the flip, in the same window, moved
        assert any(runs[0][k] != runs[1][k] for k in range(65, FLIP))
    assert runs[0][FLIP] != runs[1][FLIP]


def test_scored_slot_fits_a_token_on_its_own_target(model):
    """Flip only the target of one scored position: the scored variant's prediction there changes with it."""
    torch.manual_seed(3)
    x = torch.randint(1, VOCAB, (2, 32))
    y = torch.randint(1, VOCAB, (2, 32))
    with torch.no_grad():
        hidden = model.hidden(x).float()
    weight, cap = output_weight(model), model.head.logit_softcap
    mask = torch.zeros(2, 32)
    mask[:, 24:] = 1.0
    logp = []
    for target in (y, torch.where(torch.arange(32) == 28, (y + 1) % VOCAB, y)):
        delta, bias = slot_init(None, 2, hidden.size(-1), VOCAB, 0.85, torch.device("cpu"))
        fit_scored(hidden, weight, cap, target, mask, delta, bias, steps=8, lr=0.05, lr_min=0.005)
        with torch.no_grad():
            logp.append(torch.log_softmax(slot_logits(hidden, weight, cap, delta, bias), -1)[0, 28])
    # the original token's log-probability at position 28 depends on what position 28's target was
    assert not torch.equal(logp[0], logp[1])
    assert logp[1][(y[0, 28] + 1) % VOCAB] > logp[0][(y[0, 28] + 1) % VOCAB]


def test_causal_context_is_what_earlier_batches_scored():
    batch, wlens = [32, 40, 48, 56], [32, 32, 32, 32]
    offsets = [24, 24, 24, 24]  # scored positions 24..31 of each window; the batch's first is 32 + 24 = 56
    assert context_lengths(batch, wlens, offsets, "causal") == [24, 16, 8, 0]
    assert context_lengths(batch, wlens, offsets, "pr1333") == [24, 24, 24, 24]
    assert context_lengths([0, 8], [32, 32], [0, 24], "causal") == [0, 0]  # nothing scored before the first batch


# -- score-first TTT --------------------------------------------------------------------------------------------
def ttt_params(**changes):
    base = {"eval_seq_len": 32, "stride": 8, "eval_batch_seqs": 4, "chunk_tokens": 64, "epochs": 2, "batch_seqs": 2, "lr": 0.05, "freeze_blocks": 1}
    return ScoreFirstTTTParams(**{**base, **changes})


def chunk_sums(model, tokens, params) -> list[float]:
    sums = [0.0] * 4

    def record(ws, s, nll):
        sums[min((ws + s) // params.chunk_tokens, 3)] += float(nll.sum())

    eval_score_first_ttt(model, make_env(model, tokens), params, 32, record=record)
    return sums


def test_ttt_windows_chunks_and_lr():
    assert ttt_window_starts(100, 32, 8) == [ws for ws in range(0, 100, 8) if ws <= 92]
    chunks = chunk_windows(256, 32, 8, 64)
    assert len(chunks) == 4 and sum(map(len, chunks)) == 32
    assert chunks[0] == [0, 8, 16, 24, 32] and chunks[1][0] == 40  # window 40 scores from position 64
    assert chunk_lr(0, 5, 0.002, 0.1) == pytest.approx(0.002) and chunk_lr(4, 5, 0.002, 0.1) == pytest.approx(0.0002)
    assert chunk_lr(4, 5, 0.002, 0.0) == pytest.approx(0.0, abs=1e-12) and chunk_lr(2, 5, 0.002, 0.0) == pytest.approx(0.001)


def test_ttt_freezes_the_first_blocks(model):
    names = [n for n, _ in trainable(model, 2)]
    assert names and not any(n.startswith(("blocks.0.", "blocks.1.")) for n in names)
    assert any(n.startswith("blocks.2.") for n in names) and "embedding.tok_emb.weight" in names


def test_ttt_scores_chunks_before_training_on_them(model):
    tokens = stream(256)
    changed = tokens.clone()
    changed[129:] = torch.randint(1, VOCAB, (128,), generator=torch.Generator().manual_seed(9))  # chunks 2-3 (tokens > 2*64)
    base = chunk_sums(model, tokens, ttt_params())
    after = chunk_sums(model, changed, ttt_params())
    assert after[:2] == base[:2]  # chunks 0..1 never see what comes after them
    assert after[2:] != base[2:]
    frozen = chunk_sums(model, tokens, ttt_params(epochs=0))
    assert frozen[0] == base[0]  # the first chunk is scored before any update
    assert all(f != b for f, b in zip(frozen[1:], base[1:]))  # later chunks are scored by the adapted model


def test_ttt_restores_the_model(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[3].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    eval_score_first_ttt(model, make_env(model, stream(256)), ttt_params(), 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert all(p.grad is None for p in model.parameters())


# -- the evaluators and their per-line compliance ----------------------------------------------------------------
def test_slot_evaluator_reports_round_trip_sliding_and_slot(model):
    env = make_env(model, stream(128))
    ev = Slot(SlotParams(eval_seq_len=32, stride=8, batch_seqs=4, steps=2), train_seq_len=64)
    lines = ev.evaluate(model, env, "int6", "zstd")
    assert [line.name for line in lines] == ["final_int6_roundtrip", "final_int6_sliding_window", "final_slot"] == ev.reported_lines("int6", "zstd")
    assert all(math.isfinite(line.val_loss) and math.isfinite(line.val_bpb) for line in lines)
    assert (lines[1].val_loss, lines[1].val_bpb) == eval_sliding(model, env, 32, 8, 4)
    assert lines[2].note == "steps:2 lr:0.01"
    causal = Slot(SlotParams(variant="causal", eval_seq_len=32, stride=8, batch_seqs=4), train_seq_len=64)
    assert causal.evaluate(model, env, "int6", "zstd")[2].name == "final_causal_slot"


def test_ttt_evaluator_reports_round_trip_sliding_and_ttt(model):
    env = make_env(model, stream(256))
    ev = ScoreFirstTTT(ttt_params(), train_seq_len=64)
    lines = ev.evaluate(model, env, "int6", "zstd")
    assert [line.name for line in lines] == ["final_int6_roundtrip", "final_int6_sliding_window", "final_int6_ttt"]
    assert all(math.isfinite(line.val_loss) and math.isfinite(line.val_bpb) for line in lines)
    with pytest.raises(ValueError, match="momentum"):
        ScoreFirstTTT(ttt_params(momentum=0.0), train_seq_len=64)


def test_compliance_for_each_line():
    assert matches_label("final_{quant}_{comp}_roundtrip", "final_int8_zlib_roundtrip_exact")
    assert not matches_label("final_{quant}_roundtrip", "final_int6_sliding_window")

    full = FullVal(FullValParams(), 1024)
    assert full.compliance_for("final_int8_zlib_roundtrip").ok
    sw = SlidingWindow(SlidingWindowParams(), 2048)
    assert sw.compliance_for("final_int6_roundtrip").ok and sw.compliance_for("final_int6_sliding_window_exact").ok

    scored = Slot(SlotParams(), 2048)
    c = scored.compliance_for("final_slot")
    assert (c.what, c.ok, c.reason) == ("final_slot", False, SCORED_REASON)
    assert "depends on itself" in c.reason and "C1/C3" in c.reason
    assert scored.compliant is False
    assert scored.compliance_for("final_int6_roundtrip").ok and scored.compliance_for("final_int6_sliding_window").ok

    causal = Slot(SlotParams(variant="causal"), 2048)
    assert causal.compliant is True and causal.compliance_for("final_causal_slot_exact").ok
    assert "earlier batches" in causal.compliance_for("final_causal_slot").reason
    leaky = Slot(SlotParams(variant="pr1333"), 2048)
    assert leaky.compliant is False and not leaky.compliance_for("final_causal_slot").ok

    ttt = ScoreFirstTTT(ScoreFirstTTTParams(), 2048)
    c = ttt.compliance_for("final_int6_ttt")
    assert c.ok and "scored" in c.reason and ttt.compliance_for("final_int6_sliding_window").ok

    for ev in (full, sw, scored, ttt):
        with pytest.raises(KeyError):
            ev.compliance_for("final_something_else")
