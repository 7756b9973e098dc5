"""Techniques of the SP8192 frontier line (records #1394, #1412, #1493): the shuffled sequence loader, segment
recurrence over a virtual layer list, SDClip GPTQ with per-category clip and bits, GPTQ of the tied embedding
on the final hidden states, Hessian-aware SDClip. Each compared with a transcription of the record's code."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURE_8192, STACKS, TOKENIZER_8192, tiny_stack
from pgolf_core.model.gpt import build_model
from pgolf.plugins.loader.shuffled import ShuffledSequenceLoader
from pgolf.plugins.topology.segment_recurrence import SegmentRecurrence, SegmentSchedule, split, virtual_layers


# -- transcriptions of PR #1394's code (records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2) --
class RefShuffledSequenceLoader:
    """#1394's ``ShuffledSequenceLoader`` (its ``h`` fields as arguments), transcribed."""

    def __init__(self, train_files, seq_len, rank, world_size):
        self.world_size = world_size
        self.seq_len = seq_len
        all_files = [Path(p) for p in sorted(glob.glob(train_files))]
        self.files = all_files[rank::world_size]
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.num_tokens = [int(np.fromfile(f, dtype="<i4", count=256)[2]) for f in self.files]
        self.start_inds = [[] for _ in self.files]
        for si in range(len(self.files)):
            self._reset_shard(si)

    def _reset_shard(self, si):
        max_phase = min(self.seq_len - 1, max(0, self.num_tokens[si] - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        num_sequences = (self.num_tokens[si] - 1 - phase) // self.seq_len
        sequence_order = self.rng.permutation(num_sequences)
        self.start_inds[si] = (phase + sequence_order * self.seq_len).tolist()

    def next_batch(self, global_tokens, grad_accum_steps):
        device_tokens = global_tokens // (self.world_size * grad_accum_steps)
        device_batch_size = device_tokens // self.seq_len
        remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
        x = torch.empty((device_batch_size, self.seq_len), dtype=torch.int64)
        y = torch.empty((device_batch_size, self.seq_len), dtype=torch.int64)
        for bi in range(device_batch_size):
            total = remaining.sum()
            if total <= 0:
                for si in range(len(self.files)):
                    self._reset_shard(si)
                remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
                total = remaining.sum()
            probs = remaining / total
            si = int(self.rng.choice(len(self.files), p=probs))
            start_ind = self.start_inds[si].pop()
            remaining[si] -= 1
            mm = np.memmap(self.files[si], mode="r", dtype="<u2", offset=1024, shape=(self.num_tokens[si],))
            window = torch.as_tensor(np.array(mm[start_ind : start_ind + self.seq_len + 1], dtype=np.int64))
            x[bi] = window[:-1]
            y[bi] = window[1:]
        return x, y


def _train_files():
    return sorted(Path(FIXTURE_8192).glob("fineweb_train_*.bin"))


@pytest.mark.parametrize("world_size", [1, 2])
def test_shuffled_loader_matches_the_record_through_a_reshuffle(world_size):
    files = _train_files()
    seq_len, accum, global_tokens = 512, 2, 16 * 512
    for rank in range(world_size):
        ref = RefShuffledSequenceLoader(str(Path(FIXTURE_8192) / "fineweb_train_*.bin"), seq_len, rank, world_size)
        ours = ShuffledSequenceLoader(files, rank, world_size, torch.device("cpu"), vocab_size=8192)
        windows = sum(ref.num_tokens) // seq_len
        for _ in range(windows // (global_tokens // (world_size * accum * seq_len)) + 3):  # past one reshuffle
            rx, ry = ref.next_batch(global_tokens, accum)
            b = ours.next_batch(global_tokens, seq_len, accum)
            assert torch.equal(b.inputs, rx) and torch.equal(b.targets, ry)
        assert ours.files == files[rank::world_size]


def test_shuffled_loader_first_windows_and_resume():
    files = _train_files()
    loader = ShuffledSequenceLoader(files, 0, 1, torch.device("cpu"))
    b = loader.next_batch(4 * 64, 64, 1)
    # PCG64(0): shard phases and permutations, then the shard picks, give these windows (fixture_sp8192)
    assert b.inputs.shape == (4, 64) and torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    starts = [int(s) for s in (loader.start_inds[0][-1:] + loader.start_inds[1][-1:])]
    assert all(0 <= s < 87_073 for s in starts)
    state = loader.state_dict()
    nxt = loader.next_batch(4 * 64, 64, 1)
    again = ShuffledSequenceLoader(files, 0, 1, torch.device("cpu"))
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(4 * 64, 64, 1).inputs, nxt.inputs)
    with pytest.raises(ValueError, match="no training shard"):
        ShuffledSequenceLoader(files, 2, 3, torch.device("cpu"))


# -- segment recurrence ------------------------------------------------------------------------------------------
def _ref_indices(num_layers, loop_start, loop_end, num_loops):
    """#1394's GPT.__init__ index lists, transcribed."""
    loop_seg = list(range(loop_start, loop_end + 1))
    all_indices = list(range(loop_start))
    for _ in range(num_loops + 1):
        all_indices.extend(loop_seg)
    all_indices.extend(range(loop_end + 1, num_layers))
    num_enc = len(all_indices) // 2
    return all_indices[:num_enc], all_indices[num_enc:]


def test_virtual_layer_lists_of_the_records():
    # #1394: 11 layers, loop 4-5, NUM_LOOPS=2 (the segment 3 times)
    enc, dec = split(virtual_layers(11, 4, 5, 3))
    assert enc == [0, 1, 2, 3, 4, 5, 4] and dec == [5, 4, 5, 6, 7, 8, 9, 10]
    # #1493: loop 3-5, as its log prints: encoder:[0, 1, 2, 3, 4, 5, 3, 4] decoder:[5, 3, 4, 5, 6, 7, 8, 9, 10]
    enc, dec = split(virtual_layers(11, 3, 5, 3))
    assert enc == [0, 1, 2, 3, 4, 5, 3, 4] and dec == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    for args in [(11, 4, 5, 2), (11, 3, 5, 2), (7, 2, 3, 2), (7, 2, 4, 1), (5, 0, 4, 3)]:
        assert split(virtual_layers(*args[:3], args[3] + 1)) == _ref_indices(*args)


def _segment_stack(registry, *extra):
    return tiny_stack(
        registry, "model.num_layers=5", *extra,
        path=_stack_file(
            '[[modifier]]\nuse = "segment_recurrence"\nloop_start = 1\nloop_end = 2\nnum_loops = 2\nstart_frac = 0.5\nphase2_frac = 0.75\n'
        ),
    )


_TMP: list[Path] = []


def _stack_file(body: str, head: str = "") -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="pgolf_sp8192_"))
    p = d / "s.toml"
    p.write_text(f'schema_version = 1\nextends = "{(STACKS / "baseline.toml").as_posix()}"\n[meta]\nname = "t"\n{head}\n{body}')
    _TMP.append(d)
    return p


def test_segment_recurrence_forward_is_the_records_loop(registry):
    stack = _segment_stack(registry)
    torch.manual_seed(0)
    model, mods = build_model(stack, registry)
    seg = next(m for m in mods if isinstance(m, SegmentRecurrence))
    sched = model.topology.schedule
    assert isinstance(sched, SegmentSchedule)
    assert sched.num_skips == 4 and tuple(model.topology.skip_weights.shape) == (4, 64)  # min(4, 5) over [0,1,2,1,2,1,2,3,4]
    with torch.no_grad():
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.proj.weight, std=0.1)
            torch.nn.init.normal_(blk.mlp.proj.weight, std=0.1)
        model.topology.skip_weights.copy_(torch.rand(4, 64) + 0.5)
    x0 = torch.randn(2, 8, 64)

    def reference(enc, dec):  # #1394's forward_logits between x0 and final_norm (skip gates off)
        x, skips = x0, []
        for i in enc:
            x = model.blocks[i](x, x0, {})
            skips.append(x)
        for skip_idx, i in enumerate(dec):
            if skip_idx < 4 and skips:
                x = x + model.topology.skip_weights[skip_idx][None, None, :] * skips.pop()
            x = model.blocks[i](x, x0, {})
        return x

    logs: list[str] = []
    state = type("S", (), {})()
    state.log, state.train_time_ms = logs.append, 0.0
    with torch.no_grad():
        for phase, (enc, dec) in [(0, ([0, 1], [2, 3, 4])), (1, ([0, 1, 2], [1, 2, 3, 4])), (2, ([0, 1, 2, 1], [2, 1, 2, 3, 4]))]:
            torch.testing.assert_close(model.topology(x0, x0, model.blocks), reference(enc, dec), rtol=0, atol=0)
            # the switch: run.iterations = 2 in the tiny stack; fracs 0.5 (phase 1) then 1.0 >= 0.75 (phase 2)
            state.step = phase + 1
            seg.on_step_start(state)
    assert logs == [
        "layer_loop:phase1 step:1 frac:0.500 encoder:[0, 1, 2] decoder:[1, 2, 3, 4]",
        "layer_loop:phase2 step:2 frac:1.000 encoder:[0, 1, 2, 1] decoder:[2, 1, 2, 3, 4]",
    ]
    assert seg.state_dict() == {"phase": 2}
    with seg.sequential_view():
        assert sched.encoder() == [0, 1]
    assert sched.encoder() == [0, 1, 2, 1]


def test_segment_recurrence_one_phase_switch_and_eval(registry):
    stack = _segment_stack(registry, "modifier[0].phase2_frac=0.0", "modifier[0].start_frac=0.6")
    model, mods = build_model(stack, registry)
    seg = next(m for m in mods if isinstance(m, SegmentRecurrence))
    logs: list[str] = []
    state = type("S", (), {})()
    state.log, state.train_time_ms = logs.append, 0.0
    state.step = 1
    seg.on_step_start(state)  # 0.5 < 0.6
    assert model.topology.schedule.phase == 0
    seg.on_train_end(state)
    assert logs == ["layer_loop:enabled for_eval encoder:[0, 1, 2, 1] decoder:[2, 1, 2, 3, 4]"]
    # time-based fraction: elapsed over (cap - reserve)
    timed = SegmentRecurrence(seg.params.__class__(start_frac=0.5, clock_reserve_seconds=12.0), 100, 600.0)
    assert timed.frac(10, 294_000.0) == pytest.approx(0.5)


# -- SDClip / Hessian-aware SDClip / tied-embedding GPTQ -------------------------------------------------------------
def ref_gptq_quantize_weight(w, H, clip_sigmas=3.0, clip_range=63, block_size=128, hessian_clip_lambda=0.0):
    """#1412's ``gptq_quantize_weight`` (``hessian_clip_lambda = 0`` is #1394's), transcribed."""
    W_orig = w.float().clone()
    rows, cols = W_orig.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = 0.01 * H.diag().mean()
    H.diagonal().add_(damp)
    perm = torch.argsort(H.diag(), descending=True)
    invperm = torch.argsort(perm)
    W_perm = W_orig[:, perm].clone()
    W_perm[:, dead[perm]] = 0
    H = H[perm][:, perm]
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    row_std = W_orig.std(dim=1)
    if hessian_clip_lambda > 0.0:
        diagH = torch.diag(H[invperm][:, invperm]).clamp_min(1e-8)
        col_importance = diagH / diagH.mean()
        row_importance = (W_orig.abs() * col_importance.unsqueeze(0)).mean(dim=1)
        row_importance = row_importance / row_importance.mean()
        adj = 1.0 + hessian_clip_lambda * (row_importance - 1.0)
        s = (clip_sigmas * row_std * adj / clip_range).clamp_min(1e-10).to(torch.float16)
    else:
        s = (clip_sigmas * row_std / clip_range).clamp_min(1e-10).to(torch.float16)
    sf = s.float()
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    W_work = W_perm.clone()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W_block = W_work[:, i1:i2].clone()
        Hinv_block = Hinv[i1:i2, i1:i2]
        Err = torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            w_col = W_block[:, j]
            d = Hinv_block[j, j]
            q_col = torch.clamp(torch.round(w_col / sf), -clip_range, clip_range)
            Q[:, i1 + j] = q_col.to(torch.int8)
            err = (w_col - q_col.float() * sf) / d
            Err[:, j] = err
            W_block[:, j:] -= err.unsqueeze(1) * Hinv_block[j, j:].unsqueeze(0)
        if i2 < cols:
            W_work[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q[:, invperm], s


def _wh(rows=24, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(200, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    H = x.T @ x / 4
    H[5, :] = 0
    H[:, 5] = 0  # a dead column
    return w, H


def test_sdclip_scale_is_k_row_std_over_clip_range():
    from pgolf.plugins.quantizer.sdclip import round_at, sdclip_scales

    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    s = sdclip_scales(w, 12.85, 31)
    # std([1,2,3,4]) = 1.2909944 (unbiased); 12.85 * 1.2909944 / 31 = 0.5351219 -> fp16 0.53515625
    assert s.dtype == torch.float16 and s[0].item() == 0.53515625
    assert s[1].item() == pytest.approx(12.85 * 0.5 / 31, rel=1e-3) and s[2].item() == 0.0  # 1e-10 underflows in fp16
    q = round_at(w[:2], s[:2], 31)
    assert q.tolist() == [[2, 4, 6, 7], [0, 0, 0, 5]]  # round(1/0.535)=2, ..., 4/0.535=7.47 -> 7; 1/0.2073=4.82 -> 5


@pytest.mark.parametrize("lam, k, bits, block", [(0.0, 12.85, 6, 16), (0.0, 20.0, 8, 128), (0.175, 12.85, 6, 16), (0.3, 3.0, 7, 7)])
def test_sdclip_gptq_matches_the_records_function(lam, k, bits, block):
    from pgolf.plugins.quantizer.hessian_sdclip import row_importance_multipliers
    from pgolf.plugins.quantizer.sdclip import sdclip_gptq

    w, H = _wh()
    cr = 2 ** (bits - 1) - 1
    rq, rs = ref_gptq_quantize_weight(w, H, clip_sigmas=k, clip_range=cr, block_size=block, hessian_clip_lambda=lam)
    mult = row_importance_multipliers(w, H, lam) if lam > 0 else None
    q, s = sdclip_gptq(w, H, k, cr, block, 0.01, mult)
    assert torch.equal(s, rs)
    assert torch.equal(q, rq)
    assert int(q.abs().max()) <= cr


def test_hessian_row_importance_real_numbers():
    from pgolf.plugins.quantizer.hessian_sdclip import row_importance_multipliers

    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    H = torch.diag(torch.tensor([3.0, 1.0]))
    # damped diag: 3 + 0.02, 1 + 0.02 -> col importance 3.02/2.02, 1.02/2.02 = 1.4950495, 0.5049505
    # row importance: [0.7475248, 0.2524752, 1.0] / mean 0.6666667 = [1.1212871, 0.3787129, 1.5]
    m = row_importance_multipliers(w, H, 0.175)
    torch.testing.assert_close(m, torch.tensor([1.0212252, 0.8912748, 1.0875]), rtol=0, atol=1e-6)


def _sdclip_stack(registry, quantizer: str, *extra):
    head = f'[loader]\nuse = "shuffled"\n[quantizer]\nuse = "{quantizer}"\ncalib_batches = 2\nkeep_float_max_numel = 4096\n'
    body = (
        '[[modifier]]\nuse = "segment_recurrence"\nloop_start = 1\nloop_end = 2\nnum_loops = 2\nstart_frac = 0.5\n'
        '[[modifier]]\nuse = "tied_embedding_gptq"\n'
    )
    return tiny_stack(registry, "model.num_layers=4", "model.model_dim=64", "model.vocab_size=8192",
                      "data.train_batch_tokens=1024", "data.val_batch_size=4096",
                      f'data.path="{FIXTURE_8192}"', f'data.tokenizer="{TOKENIZER_8192}"', *extra,
                      path=_stack_file(body, head))


def test_embedding_hessian_is_the_final_hidden_state(registry):
    from pgolf_core.calibration import collect_hessians

    stack = _sdclip_stack(registry, "sdclip")
    torch.manual_seed(0)
    model, mods = build_model(stack, registry)
    assert model.hessian_taps == {"embedding.tok_emb.weight": model.final_norm}
    x = torch.randint(0, 8192, (2, 16))
    H = collect_hessians(model, [(x, x), (x.flip(0), x)])
    with torch.no_grad():
        h = model.hidden(x).reshape(-1, 64)
    torch.testing.assert_close(H["embedding.tok_emb.weight"], h.T @ h, rtol=1e-5, atol=1e-5)  # (2 forwards, same rows) / 2
    # an untied head has its own linear layer (its input, the same hidden state, is collected anyway): no tap
    from pgolf.plugins.quantizer.tied_embedding_gptq import TiedEmbeddingGPTQ, TiedEmbeddingGPTQParams, token_table_name

    untied, _ = build_model(_sdclip_stack(registry, "sdclip", "model.tie_embeddings=false"), registry)
    assert token_table_name(model) == "embedding.tok_emb.weight" and token_table_name(untied) is None
    assert untied.hessian_taps == {}
    TiedEmbeddingGPTQ(TiedEmbeddingGPTQParams()).attach(untied)
    assert untied.hessian_taps == {}


@pytest.mark.parametrize("quantizer", ["sdclip", "hessian_sdclip"])
def test_sdclip_stack_calibrates_on_shuffled_batches_quantizes_and_round_trips(registry, quantizer):
    """The stack's pieces together: shuffled loader batches -> Hessians (blocks' linears and the tied table) ->
    SDClip GPTQ per category -> artifact -> dequantized weights close to the originals."""
    from pgolf_core.calibration import CalibrationContext
    from pgolf_core.model.roles import parameter_roles
    from pgolf_core.train import build_slot
    from pgolf_core.runtime import setup_runtime

    stack = _sdclip_stack(registry, quantizer)
    torch.manual_seed(0)
    model, mods = build_model(stack, registry)
    with torch.no_grad():
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.proj.weight, std=0.05)
            torch.nn.init.normal_(blk.mlp.proj.weight, std=0.05)
    next(m for m in mods if isinstance(m, SegmentRecurrence)).schedule.phase = 2
    quant = build_slot(stack, registry, "quantizer")
    loader_cls = build_slot(stack, registry, "loader")
    loader = loader_cls(_train_files(), 0, 1, torch.device("cpu"), 8192)

    def batches(n):
        for _ in range(n):
            yield loader.next_batch(1024, 64, 8)

    logs: list[str] = []
    ctx = CalibrationContext(model, setup_runtime(stack), 0, 64, 8192, logs.append, batches, mods)
    quant.calibrate(ctx)
    assert "embedding.tok_emb.weight" in quant.hessians and quant.hessians["embedding.tok_emb.weight"].shape == (64, 64)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    obj, stats = quant.quantize(sd, parameter_roles(model))
    m = obj["m"]
    assert m["embedding.tok_emb.weight"] == {"type": "int8", "how": "gptq"}
    assert m["blocks.0.mlp.fc.weight"] == {"type": "int6", "how": "gptq"}
    assert m["blocks.0.attn.c_q.weight"] == "passthrough"  # 4096 elements: not above keep_float_max_numel
    assert stats["num_round"] == 0 and stats["num_gptq"] == 1 + 2 * 4
    assert int(obj["w"]["blocks.0.mlp.fc.weight.q"].abs().max()) <= 31
    back = quant.dequantize(obj)
    # int6 at k = 12.85: step 0.41 std (rounding alone ~0.12 std, GPTQ's error feedback moves weights more);
    # int8 at k = 20: step 0.157 std
    for name, bound in (("embedding.tok_emb.weight", 0.1), ("blocks.1.mlp.proj.weight", 0.3)):
        rel = (back[name] - sd[name]).norm() / sd[name].norm()
        assert 0 < rel < bound, (name, rel)


# -- the references (tests/data/parity/pr1394.json, pr1493.json) against these techniques' switches ---------------
@pytest.mark.parametrize("pr", ["pr1394", "pr1493"])
def test_reference_runs_switch_and_route_as_these_techniques_do(pr):
    import json
    import re

    from conftest import PARITY
    from pgolf.plugins.quantizer.sdclip import SDClipGPTQ, SDClipParams
    from pgolf.plugins.topology.segment_recurrence import SegmentRecurrenceParams

    cases = json.loads((PARITY / f"{pr}.json").read_text())
    assert sorted(c["nproc"] for c in cases.values()) == [1, 2]
    for case in cases.values():
        env = case["env"]
        for key in ("env", "nproc", "params", "train_loss", "val", "finals", "events", "conditions"):
            assert key in case
        n_layers, start, end, loops = (int(env[k]) for k in ("num_layers", "loop_start", "loop_end", "num_loops"))
        iters = int(env["iterations"])
        assert sorted(int(s) for s in case["train_loss"]) == list(range(1, iters + 1))
        # the recurrence switch: step and virtual lists as segment_recurrence computes them
        start_frac = {"pr1394": 0.5, "pr1493": 0.35}[pr]  # the scripts' ENABLE_LOOPING_AT defaults
        rec = SegmentRecurrence(SegmentRecurrenceParams(loop_start=start, loop_end=end, num_loops=loops, start_frac=start_frac), iters, 0.0)
        rec.schedule = SegmentSchedule(n_layers, n_layers // 2, rec.params)
        logs: list[str] = []
        state = type("S", (), {})()
        state.log, state.train_time_ms = logs.append, 0.0
        for step in range(iters):
            state.step = step
            rec.on_step_start(state)
        event = next(e for e in case["events"] if e.startswith("layer_loop:enabled"))
        assert logs == [event]
        # SDClip routing: the record's "Quantized weights:" categories
        d, mlp = int(env["model_dim"]), int(float(env["mlp_mult"]) * int(env["model_dim"]))
        kv = d // int(env["num_heads"]) * int(env["num_kv_heads"])
        sd = {"embedding.tok_emb.weight": torch.randn(8192, d), "blocks.0.mlp.fc.weight": torch.randn(mlp, d), "blocks.0.mlp.proj.weight": torch.randn(d, mlp),
              "blocks.0.attn.c_q.weight": torch.randn(d, d), "blocks.0.attn.c_k.weight": torch.randn(kv, d), "blocks.0.attn.proj.weight": torch.randn(d, d)}
        obj, _ = SDClipGPTQ(SDClipParams()).quantize(sd, {})
        got = {n: (m if isinstance(m, str) else m["type"]) for n, m in obj["m"].items()}
        assert got == {"embedding.tok_emb.weight": "int8", "blocks.0.mlp.fc.weight": "int6", "blocks.0.mlp.proj.weight": "int6",
                       "blocks.0.attn.c_q.weight": "passthrough", "blocks.0.attn.c_k.weight": "passthrough", "blocks.0.attn.proj.weight": "passthrough"}
        assert "  gptq (int6): blocks.mlp.fc.weight, blocks.mlp.proj.weight" in case["events"] and "  gptq (int8): tok_emb.weight" in case["events"]
        assert re.search(r"GPTQ:collected 15 Hessians", " ".join(case["events"]))  # 7 layers x 2 MLP matrices + the tied table


def test_the_records_env_names_reach_these_techniques(registry):
    """--legacy-env: the records' variables set the parameters (the pr1493 reference's env, plus #1412's)."""
    import json

    from conftest import PARITY
    from pgolf_core.config import load_stack

    env = {k.upper(): v for k, v in json.loads((PARITY / "pr1493.json").read_text())["pr1493_tiny_1proc"]["env"].items()}
    env.update({"ENABLE_LOOPING_AT": "0.35", "LOOP_PHASE2_AT": "0.65", "HESSIAN_CLIP_LAMBDA": "0.175", "MATRIX_CLIP_SIGMAS": "12.85",
                "EMBED_CLIP_SIGMAS": "20", "EMBED_BITS": "7", "GPTQ_RESERVE_SECONDS": "12"})
    path = _stack_file('[[modifier]]\nuse = "segment_recurrence"\n', '[loader]\nuse = "shuffled"\n[quantizer]\nuse = "hessian_sdclip"\n')
    stack = load_stack(path, registry, legacy_env=env)
    seg = stack.modifiers[0].params
    assert (seg.loop_start, seg.loop_end, seg.num_loops, seg.start_frac, seg.phase2_frac, seg.clock_reserve_seconds) == (2, 4, 2, 0.35, 0.65, 12.0)
    assert stack.technique("quantizer") == "hessian_sdclip" and stack.technique("loader") == "shuffled"
    q = stack.params("quantizer")
    assert (q.hessian_clip_lambda, q.matrix_clip_sigmas, q.embed_clip_sigmas, q.embed_bits, q.calib_batches) == (0.175, 12.85, 20.0, 7, 4)


def test_segment_recurrence_compiles_fullgraph_and_recompiles_per_phase(registry):
    stack = _segment_stack(registry)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    sched = model.topology.schedule
    x = torch.randint(0, 1024, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    for phase in (2, 0):
        sched.phase = phase
        torch.testing.assert_close(compiled(x, x), model(x, x))


def _broadcast_worker(rank, world, init, out):
    import torch.distributed as dist

    from pgolf.plugins.quantizer.sdclip import broadcast_from_rank0

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = {"b": torch.full((2, 2), float(rank + 1)), "a": torch.full((3, 3), 10.0 * (rank + 1))}
        got = broadcast_from_rank0(mine, torch.device("cpu"))
        torch.save(got, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sdclip_takes_rank0s_hessians_on_every_rank(tmp_path):
    """The record's ranks collect Hessians from their own shards, and all load the file rank 0 wrote."""
    import torch.multiprocessing as mp

    from pgolf.plugins.quantizer.sdclip import broadcast_from_rank0

    one = {"a": torch.ones(2, 2)}
    assert broadcast_from_rank0(one, torch.device("cpu")) is one  # one process: unchanged
    mp.spawn(_broadcast_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["b"], torch.full((2, 2), 1.0)) and torch.equal(got["a"], torch.full((3, 3), 10.0))


def test_segment_recurrence_as_record_1285_runs_it(registry):
    """#1285: RECUR_LAYERS names the segment (one extra pass), RECUR_START_STEP switches it on at the top of a
    step, before that step's validation; skip weights for the physical halves, the last reused while skips remain."""
    from pgolf_core.config import load_stack

    body = '[[modifier]]\nuse = "segment_recurrence"\nlayers = [3, 4]\nnum_loops = 1\nstart_step = 30\nskip_weights = "physical"\n'
    stack = load_stack(_stack_file(body), registry, legacy_env={"RECUR_LAYERS": "1,2", "RECUR_START_STEP": "8"})
    assert stack.modifiers[0].layers == [1, 2] and stack.modifiers[0].params.start_step == 8
    stack = tiny_stack(registry, "model.num_layers=5", path=_stack_file(body.replace("[3, 4]", "[1, 2]").replace("30", "8")))
    torch.manual_seed(0)
    model, mods = build_model(stack, registry)
    seg = next(m for m in mods if isinstance(m, SegmentRecurrence))
    sched = model.topology.schedule
    assert sched.num_skips == 2 and tuple(model.topology.skip_weights.shape) == (2, 64)  # min(2, 3), as without recurrence
    with torch.no_grad():
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.proj.weight, std=0.1)
            torch.nn.init.normal_(blk.mlp.proj.weight, std=0.1)
        model.topology.skip_weights.copy_(torch.rand(2, 64) + 0.5)
    x0 = torch.randn(2, 8, 64)

    def reference(v2p):  # #1285's GPT.forward between x0 and final_norm (skip gates off): skip_i = min(i, n - 1)
        enc_layers, x, skips = len(v2p) // 2, x0, []
        for i in v2p[:enc_layers]:
            x = model.blocks[i](x, x0, {})
            skips.append(x)
        for i, p in enumerate(v2p[enc_layers:]):
            if skips:
                x = x + model.topology.skip_weights[min(i, 1)][None, None, :] * skips.pop()
            x = model.blocks[p](x, x0, {})
        return x

    logs: list[str] = []
    state = type("S", (), {})()
    state.log, state.train_time_ms = logs.append, 0.0
    with torch.no_grad():
        torch.testing.assert_close(model.topology(x0, x0, model.blocks), reference([0, 1, 2, 3, 4]), rtol=0, atol=0)
        for step in range(9):
            state.step = step
            seg.on_eval_start(state) if step == 8 else seg.on_step_start(state)
        torch.testing.assert_close(model.topology(x0, x0, model.blocks), reference([0, 1, 2, 1, 2, 3, 4]), rtol=0, atol=0)
    assert logs == ["recurrence: layers=[1, 2] start_step=8 active=0", "recurrence:activated step:8 layers:[1, 2] virtual_layers:7"]
    assert sched.encoder() == [0, 1, 2] and sched.decoder() == [1, 2, 3, 4]


def test_sdclip_calibration_on_training_data_takes_its_reserve_off_the_training_clock():
    """#1394's GPTQ_RESERVE_SECONDS=12: the loop stops 12 s early and the training-batch Hessians are read in
    that slice (compliant); without a reserve they are read after the clock (not compliant)."""
    from pgolf_core.contracts import train_budget_ms, train_time_reserve
    from pgolf.plugins.quantizer.sdclip import SDClipGPTQ, SDClipParams

    q = SDClipGPTQ(SDClipParams(reserve_seconds=12.0))
    assert train_time_reserve([q]) == 12.0 and train_budget_ms(600.0, train_time_reserve([q])) == 588_000.0
    (c,) = q.compliance
    assert c.ok and "inside the seconds reserved from the training clock" in c.reason and "12 s reserve" in c.reason
    (c,) = SDClipGPTQ(SDClipParams()).compliance
    assert not c.ok and train_time_reserve([SDClipGPTQ(SDClipParams())]) == 0.0



def test_record_1493s_parallel_residual_start_selects_the_parallel_blocks(registry):
    """#1493 names the first parallel layer PARALLEL_RESIDUAL_START (#1392: PARALLEL_START_LAYER); negative: none."""
    from pgolf_core.config import load_stack

    body = '[[modifier]]\nuse = "parallel_residual"\nlayers = "7:"\n'
    assert load_stack(_stack_file(body), registry, legacy_env={"PARALLEL_RESIDUAL_START": "5"}).modifiers[0].layers == "5:"
    assert load_stack(_stack_file(body), registry, legacy_env={}).modifiers[0].layers == "7:"


@pytest.mark.parametrize("total, seq_len, stride, chunk", [(19968, 64, 32, 4096), (256, 32, 8, 64), (1000, 64, 16, 300), (4095, 2048, 64, 1024)])
def test_score_first_ttt_score_once_windows_are_record_1493s(total, seq_len, stride, chunk):
    """#1493's eval_val_ttt: starts while ws + seq_len - stride < total, scored from seq_len - stride, each window in
    the chunk of its first scored token; every token scored exactly once."""
    from pgolf.plugins.evaluator.sliding_window import scored_offset
    from pgolf.plugins.evaluator.ttt import chunk_windows

    context = seq_len - stride
    n_chunks = (total + chunk - 1) // chunk
    ref: list[list[int]] = [[] for _ in range(n_chunks)]
    for ws in [ws for ws in range(0, total, stride) if ws + context < total]:
        ref[min((ws + (0 if ws == 0 else context)) // chunk, n_chunks - 1)].append(ws)
    got = chunk_windows(total, seq_len, stride, chunk, score_once=True)
    assert got == ref
    scored = [min(ws + seq_len, total) - ws - scored_offset(ws, min(ws + seq_len, total) - ws, stride, seq_len) for c in got for ws in c]
    assert sum(scored) == total
