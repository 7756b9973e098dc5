"""The n-gram tilt evaluator (record #1514): its hints against a line-by-line transcription of the record's C++
ContextMixer, its tilt against the record's ``tilt_nll``, the refusal of the leaking experts, and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_stack

from pgolf_core.evaluate import EvalEnv, ValData
from pgolf_core.model.gpt import build_model
from pgolf_core.train import build_slot
from pgolf.plugins.evaluator.ngram_tilt import NgramTilt, NgramTiltParams, order_hints, tilt_nll, token_hints
from pgolf.plugins.tokenizer.sentencepiece import PieceBytes

M64 = (1 << 64) - 1
PRIMES = [36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521, 1048583, 1179653,
          1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319, 2490389, 2621471, 2752549,
          2883617, 3014687, 3145757, 3276833, 3407903, 3538973]
TABLE_MIX, EMPTY = 0x9E3779B97F4A7C15, M64


class OpenTable:
    """fused_expert_kernel.cpp ``OpenTable``: open addressing, 16 probes, uint16 best_tok/best_count."""

    def __init__(self, bits: int) -> None:
        self.mask = (1 << bits) - 1
        self.ctx = [[EMPTY, 0, 0, 0] for _ in range(1 << bits)]  # key, count, best_tok, best_count
        self.pair = [[EMPTY, 0] for _ in range(1 << bits)]

    def lookup(self, key):
        slot = ((key * TABLE_MIX) & M64) & self.mask
        for p in range(16):
            e = self.ctx[(slot + p) & self.mask]
            if e[0] == key:
                return e[2], e[3] / e[1], e[1]
            if e[0] == EMPTY:
                break
        return -1, 0.0, 0

    def update(self, ctx_key, pair_key, token):
        pair_count = 0
        slot = ((pair_key * TABLE_MIX) & M64) & self.mask
        for p in range(16):
            e = self.pair[(slot + p) & self.mask]
            if e[0] == pair_key:
                e[1] += 1
                pair_count = e[1]
                break
            if e[0] == EMPTY:
                e[0], e[1], pair_count = pair_key, 1, 1
                break
        slot = ((ctx_key * TABLE_MIX) & M64) & self.mask
        for p in range(16):
            e = self.ctx[(slot + p) & self.mask]
            if e[0] == ctx_key:
                e[1] += 1
                if token == e[2]:
                    e[3] = (e[3] + 1) & 0xFFFF
                elif pair_count > e[3]:
                    e[2], e[3] = token, min(pair_count, 65535)
                return
            if e[0] == EMPTY:
                self.ctx[(slot + p) & self.mask] = [ctx_key, 1, token, 1]
                return


def record_token_hints(tokens: list[int], base_beta=2.0, order_stride=2, scale=1.0, bits=12):
    """``ContextMixer::get_hints_batch`` over positions 1..n-1 with the within/word experts never hinting (their
    thresholds above 1), as #1514's ngram_tilt.py calls it; hint -1/beta 0 at position 0."""
    cfg = {o: ((0.70 if o <= 10 else 0.60 if o <= 13 else 0.50) * scale, 3 if o <= 10 else 2) for o in range(8, 17)}
    active = {o: (o - 8) % order_stride == 0 for o in range(8, 17)}
    tables = {o: OpenTable(bits) for o in range(8, 17) if active[o]}
    hints, betas = [-1], [0.0]
    for p in range(1, len(tokens)):
        hashes, h = [], 0
        for k in range(min(16, p)):
            h ^= (tokens[p - k - 1] * PRIMES[k % 32]) & M64
            hashes.append(h)
        max_avail = min(16, p)
        out_tok, out_beta = -1, 0.0
        for order in range(min(16, max_avail), 7, -1):
            if not active[order]:
                continue
            hint, conf, count = tables[order].lookup(hashes[order - 1])
            if hint >= 0 and conf >= cfg[order][0] and count >= cfg[order][1]:
                out_tok, out_beta = hint, base_beta * conf
                break
        hints.append(out_tok)
        betas.append(out_beta)
        tok = tokens[p]
        for order in range(8, min(16, max_avail) + 1):
            if active[order]:
                ch = hashes[order - 1]
                tables[order].update(ch, ((ch * 1000003) & M64) ^ ((tok * PRIMES[order % 32]) & M64), tok)
    return hints, betas


def record_tilt_nll(hints, betas, scored_nll, scored_logits, target_ids, global_positions):
    """#1514 ``NgramTiltState.tilt_nll``, verbatim."""
    hints = hints[global_positions]
    betas = betas[global_positions]
    has_hint = (hints >= 0).to(torch.float64)
    logit_tgt = scored_logits.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    safe_h = hints.clamp(min=0)
    logit_hint = scored_logits.gather(-1, safe_h.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    lse = scored_nll + logit_tgt
    p_hint = (logit_hint - lse).exp().clamp(0.0, 1.0)
    Z = 1.0 + p_hint * (betas.exp() - 1.0)
    is_hit = (target_ids == hints).to(torch.float64)
    return scored_nll + has_hint * (Z.log() - betas * is_hit)


def repetitive(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Phrases of 10-20 tokens drawn from a pool of 12 and copied with 5% noise, so every order finds contexts
    that repeat, some with one follower and some with competing ones."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, vocab, (int(torch.randint(10, 20, (1,), generator=g)),), generator=g) for _ in range(12)]
    out: list[int] = []
    while len(out) < n:
        phrase = pool[int(torch.randint(0, len(pool), (1,), generator=g))].clone()
        noise = torch.rand(phrase.numel(), generator=g) < 0.05
        phrase[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
        out += phrase.tolist()
    return torch.tensor(out[:n])


@pytest.mark.parametrize("order_stride,scale,seed", [(2, 1.0, 0), (1, 1.0, 1), (3, 0.8, 2)])
def test_hints_match_the_record_kernel(order_stride, scale, seed):
    tokens = repetitive(1500, 6, seed)
    hints, betas = token_hints(tokens, 2.0, order_stride, scale)
    ref_h, ref_b = record_token_hints(tokens.tolist(), 2.0, order_stride, scale)
    assert hints.tolist() == ref_h
    assert betas.tolist() == ref_b  # bit-identical float64
    assert (hints >= 0).sum() > 150  # the stream really exercises the expert
    assert ((betas > 0) & (betas < 2.0)).any()  # and contexts with competing followers


def test_hints_on_a_hand_example():
    # "0..9" four times. Order 8 and 10 contexts need 3 earlier sightings (the stream has at most 2 before p = 40);
    # order 12 needs 2 with confidence >= 0.6: the context ending at p - 1 first appears at p >= 12, so its second
    # sighting is at p - 10 >= 22 and positions 32..39 get hint p % 10 with confidence 1, beta 2.0
    tokens = torch.tensor(list(range(10)) * 4)
    hints, betas = token_hints(tokens)
    assert hints[:32].tolist() == [-1] * 32
    assert hints[32:].tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert betas[32:].tolist() == [2.0] * 8
    ref_h, ref_b = record_token_hints(tokens.tolist())
    assert hints.tolist() == ref_h and betas.tolist() == ref_b


def test_hint_never_depends_on_the_token_it_scores():
    tokens = repetitive(600, 5, 3)
    hints, betas = token_hints(tokens)
    for p in (100, 333, 599):
        changed = tokens.clone()
        changed[p:] = (changed[p:] + 1) % 5
        h2, b2 = token_hints(changed)
        assert torch.equal(h2[: p + 1], hints[: p + 1]) and torch.equal(b2[: p + 1], betas[: p + 1])


def test_tilt_matches_the_record_and_hand_numbers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    nll = F.cross_entropy(logits, targets, reduction="none").to(torch.float64)
    all_hints = torch.tensor([-1, 0, 2, 1, 4, -1, 3, 0])
    all_betas = torch.tensor([0.0, 1.5, 2.0, 0.7, 1.0, 0.0, 1.2, 2.0], dtype=torch.float64)
    pos = torch.arange(1, 7)
    ours = tilt_nll(nll, logits, targets, all_hints[pos], all_betas[pos])
    ref = record_tilt_nll(all_hints, all_betas, nll, logits, targets, pos)
    assert torch.equal(ours, ref)
    # position 1 (hint 0, beta 1.5) scores target 0, a hit: nll - 1.5 + log(1 + p0 (e^1.5 - 1))
    p = torch.softmax(logits[0].double(), -1)
    assert ours[0].item() == pytest.approx(-math.log(p[0].item()) - 1.5 + math.log(1 + p[0].item() * (math.exp(1.5) - 1)), abs=1e-6)
    assert ours[4].item() == nll[4].item()  # position 5: no hint
    # the tilted distribution is normalised: sum_t p(t) e^{beta 1[t=h]} / Z = 1
    tilted = torch.stack([tilt_nll(nll[:1] * 0 + F.cross_entropy(logits[:1], torch.tensor([t]), reduction="none").double(), logits[:1], torch.tensor([t]), torch.tensor([0]), torch.tensor([1.5], dtype=torch.float64)) for t in range(5)])
    assert torch.exp(-tilted).sum().item() == pytest.approx(1.0, abs=1e-6)
    assert [round(v, 4) for v in ours.tolist()] == [round(v, 4) for v in ref.tolist()]
    assert round(ours[0].item(), 4) == round(ref[0].item(), 4) != round(nll[0].item(), 4)


@pytest.mark.parametrize("key", ["within_beta", "word_beta"])
def test_leaking_experts_are_refused(key):
    with pytest.raises(ValueError, match=f"{key} = 0.5 enables the .* expert.*refused"):
        NgramTiltParams(**{key: 0.5})
    NgramTiltParams(**{key: 0.0})


def test_validate_refuses_a_stack_enabling_the_word_expert(registry):
    from pgolf_core.errors import ConfigError

    with pytest.raises(ConfigError, match="word_beta = 0.5 enables the word-start expert"):
        tiny_stack(registry, "evaluator.use=ngram_tilt", "evaluator.word_beta=0.5")


VOCAB = 1024


def test_evaluator_on_a_tiny_stack(registry):
    stack = tiny_stack(registry, "evaluator.use=ngram_tilt", "evaluator.eval_seq_len=32", "evaluator.stride=16",
                       "evaluator.epochs=1", "evaluator.chunk_tokens=128", "evaluator.batch_seqs=2",
                       'evaluator.label="final_{quant}_ngram_tilt"')  # the baseline's full_val label would carry over
    tilt = build_slot(stack, registry, "evaluator")
    assert isinstance(tilt, NgramTilt) and tilt.eval_seq_len == 32
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    tokens = repetitive(400, 40, 4)
    gen = torch.Generator().manual_seed(5)
    val = ValData(tokens, PieceBytes(torch.randint(1, 4, (VOCAB,), generator=gen).to(torch.int16),
                                     torch.rand(VOCAB, generator=gen) < 0.3, torch.zeros(VOCAB, dtype=torch.bool)))
    env = EvalEnv(val, 32, 128, 1, 0, 1, torch.device("cpu"), base_model=model)
    results = tilt.evaluate(model, env, "int6", "brotli")
    names = [r.name for r in results]
    assert names == ["final_int6_roundtrip", "final_int6_sliding_window", "final_int6_ngram_tilt"]
    assert all(math.isfinite(r.val_bpb) for r in results)
    assert tilt.compliance_for("final_int6_ngram_tilt").ok
    # the same pass without hints is score_first_ttt's number: the tilt moved it
    from pgolf.plugins.evaluator.ttt import eval_score_first_ttt

    plain, _ = eval_score_first_ttt(model, env, tilt.params, 32)
    assert results[-1].val_loss != pytest.approx(plain, abs=1e-9)


def test_leader_changes_only_when_a_follower_overtakes():
    # P a P b P b P _ with P twelve distinct tokens: the order-12 context P was followed by a, b, b. b ties a at
    # one sighting each (a stays leader), then overtakes: leader b, best_count 2 of 3, confidence 2/3 >= 0.60
    # (orders 8 and 10 need 0.70): hint b with beta 2 * 2/3 for the last position
    P = list(range(100, 112))
    tokens = torch.tensor(P + [1] + P + [2] + P + [2] + P + [3])
    hints, betas = token_hints(tokens)
    assert hints[-1].item() == 2 and betas[-1].item() == 2.0 * (2 / 3)
    leader, best, count = order_hints(tokens, 12)
    assert (leader[38].item(), best[38].item(), count[38].item()) == (1, 1, 2)  # after "P a P b P": tied, a still leads
    assert hints[38].item() == -1  # confidence 1/2 < 0.60
    assert (leader[51].item(), best[51].item(), count[51].item()) == (2, 2, 3)
    ref_h, ref_b = record_token_hints(tokens.tolist())
    assert hints.tolist() == ref_h and betas.tolist() == ref_b


def test_cli_lists_it_and_validate_refuses_the_word_expert_in_one_line(tmp_path):
    from conftest import run_cli

    assert "ngram_tilt" in run_cli(["list", "--slot", "evaluator"], tmp_path).stdout
    bad = run_cli(["validate", "sample", "--set", "evaluator.use=ngram_tilt", "--set", "evaluator.word_beta=0.5"], tmp_path)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evaluator.word_beta" in errors[0] and "leak" in errors[0] and "refused" in errors[0]


def test_legacy_env_maps_the_records_variables_and_refuses_its_default_within_beta(registry):
    from conftest import STACKS

    from pgolf_core.config import load_stack
    from pgolf_core.errors import ConfigError

    sets = ["evaluator.use=ngram_tilt"]
    run = {"NGRAM_BASE_BETA": "1.5", "NGRAM_ORDER_STRIDE": "1", "NGRAM_WITHIN_BETA": "0.0", "NGRAM_WORD_BETA": "0.0", "TTT_LR": "0.004"}
    params = load_stack(STACKS / "sample.toml", registry, overrides=sets, legacy_env=run).params("evaluator")
    assert (params.base_beta, params.order_stride, params.within_beta, params.lr) == (1.5, 1, 0.0, 0.004)
    with pytest.raises(ConfigError, match="within_beta = 0.92 enables the within-word expert"):
        load_stack(STACKS / "sample.toml", registry, overrides=sets, legacy_env={"NGRAM_WITHIN_BETA": "0.92"})
