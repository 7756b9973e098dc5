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
