"""The techniques of the #1218 record, on tiny inputs with the numbers the record's code gives.

Loader windows were computed with the record's own ``DistributedTokenLoader`` on the sp4096 fixture (shard paths
``data/datasets/fineweb10B_sp4096/fineweb_train_00000N.bin``, as its runs saw them)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FIXTURE_4096
from pgolf.plugins.compressor.byte_shuffle import ByteShuffle, shuffle, unshuffle
from pgolf.plugins.evaluator.sliding_window import scored_offset, window_starts
from pgolf.plugins.loader.coprime_stride import CoprimeStrideLoader, CoprimeStrideParams, build as build_loader, path_seed
from pgolf.plugins.quantizer.gptq import GPTQ, GPTQParams
from pgolf.plugins.schedule.warmdown_fraction import WarmdownFraction, WarmdownFractionParams
from pgolf.plugins.topology.gated_unet import GatedUNetSkips
from pgolf_core.contracts import BudgetAware, ReservesTrainTime, train_budget_ms, train_time_reserve
from pgolf_core.data import TRAIN_PATTERN, shard_files

# The record's first three global windows (shard, offset), seq_len 64, 4096 tokens per step, grad_accum 8 // W.
WINDOWS_W1 = [
    [(1, 77976), (0, 87407), (0, 68079), (1, 24152), (0, 77743), (1, 67736), (1, 72856), (1, 29272)],
    [(0, 33775), (1, 39512), (1, 88216), (0, 24111), (0, 4783), (1, 34392), (0, 14447), (1, 83096)],
    [(0, 43439), (1, 49752), (1, 54872), (0, 53103), (1, 11288), (1, 44632), (1, 6168), (1, 1048)],
]
WINDOWS_W2_FIRST = [(1, 25817), (0, 33775), (0, 68079), (1, 77849), (1, 2905), (0, 14447), (0, 4783), (1, 43161),
                    (1, 83417), (0, 87407), (1, 48729), (0, 24111), (0, 77743), (1, 8473), (1, 60505), (1, 66073)]


def _loader(rank=0, world=1, **kw):
    files = shard_files(FIXTURE_4096, TRAIN_PATTERN, "training")
    return build_loader(CoprimeStrideParams(**kw), None)(files, rank, world, torch.device("cpu"), 4096)


def test_path_seed_is_the_records_hash():
    assert path_seed(["a"]) == (0 ^ 97) * 1099511628211
    assert path_seed(["ab"]) == (((97 * 1099511628211) ^ 98) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    state = _loader()._rng.bit_generator.state["state"]
    assert state["state"] == 288096277449279243275638278287842013749


def test_coprime_loader_draws_the_records_windows():
    loader = _loader()
    assert [loader.global_windows(64, 8) for _ in range(3)] == WINDOWS_W1
    assert _loader(world=2).global_windows(64, 16) == WINDOWS_W2_FIRST


def test_coprime_loader_batches_split_the_global_windows_by_rank():
    x, y = _loader().next_batch(4096, 64, 8)[:2]
    assert x.shape == (8, 64) and x[0, :4].tolist() == [4013, 4066, 19, 4035] and y[0, -2:].tolist() == [134, 4066]
    assert torch.equal(x[:, 1:], y[:, :-1])
    x0 = _loader(0, 2).next_batch(4096, 64, 4).inputs
    x1 = _loader(1, 2).next_batch(4096, 64, 4).inputs
    assert x0[0, :4].tolist() == [825, 4035, 1536, 11] and x1[0, :4].tolist() == [4049, 178, 4014, 20]
    assert x0[1, :4].tolist() == x[2, :4].tolist() == [3, 2449, 3, 4035]  # (0, 33775) is global window 1 of W=2


def test_coprime_loader_state_round_trips_and_seed_dir_changes_the_stream():
    a = _loader()
    a.next_batch(4096, 64, 8)
    state = a.state_dict()
    b = _loader()
    b.load_state_dict(state)
    assert torch.equal(a.next_batch(4096, 64, 8).inputs, b.next_batch(4096, 64, 8).inputs)
    assert _loader(seed_dir="").global_windows(64, 8) != WINDOWS_W1[0]


def test_coprime_stride_pass_visits_every_window_once():
    loader = _loader()
    loader._reset_cursor(0, 64)
    n = int(loader._count[0])
    out: list = []
    loader._take(0, 64, n, out)
    phase = int(loader._phase[0])
    assert sorted(off for _, off in out) == [phase + 64 * i for i in range(n)]
    assert math.gcd(int(loader._stride[0]), n) == 1


def test_gated_skip_is_a_lerp_by_the_sigmoid_gate():
    topo = GatedUNetSkips(num_layers=4, dim=2)
    assert topo.num_skips == 2 and torch.equal(topo.skip_gates, torch.zeros(2, 2))
    with torch.no_grad():
        topo.skip_weights[1] = torch.tensor([2.0, 1.0])
        topo.skip_gates[1] = torch.tensor([0.0, math.log(3.0)])  # sigmoid: 0.5, 0.75
    x = torch.tensor([1.0, 2.0]).view(1, 1, 2)
    skip = torch.tensor([3.0, 5.0]).view(1, 1, 2)
    # scaled = (6, 5); scaled + g (x - scaled) = (6 - 2.5, 5 - 2.25)
    torch.testing.assert_close(topo.add_skip(x, 1, skip), torch.tensor([3.5, 2.75]).view(1, 1, 2))
    assert topo.add_skip(x, 0, skip).flatten().tolist() == [2.0, 3.5]  # gate 0.5, weight 1: the even mix


def test_byte_shuffle_layout_and_round_trip():
    assert shuffle(b"abcdef", 2) == b"BSHF\x02" + b"ace" + b"bdf"
    assert shuffle(b"abcdefg", 2) == b"BSHF\x02" + b"aceg" + b"bdf"
    assert shuffle(b"abcdefg", 3) == b"BSHF\x03" + b"adg" + b"be" + b"cf"
    assert shuffle(b"a", 2) == b"a" and shuffle(b"abc", 1) == b"abc"
    for data, stride in ((b"abcdefg", 2), (b"abcdefg", 3), (bytes(range(256)) * 3 + b"x", 2)):
        assert unshuffle(shuffle(data, stride)) == data
    assert unshuffle(b"plain bytes") == b"plain bytes"
    obj = {"w": {"a.q": torch.arange(-31, 32, dtype=torch.int8).repeat(40)}, "m": {"a": {"type": "int6"}}}
    for codec in ("brotli", "lzma"):
        comp = ByteShuffle(2, codec)
        assert comp.label == codec
        back = comp.decompress(comp.compress(obj))
        assert torch.equal(back["w"]["a.q"], obj["w"]["a.q"]) and back["m"] == obj["m"]


def test_warmdown_fraction_by_steps_and_by_budget_with_floor():
    s = WarmdownFraction(WarmdownFractionParams(warmdown_frac=0.5, min_lr=0.1), iterations=100, max_wallclock_seconds=0)
    assert [s.lr_mul(step, 0.0) for step in (0, 40, 50, 75, 90, 95, 100)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.2, 0.1, 0.1])
    capped = WarmdownFraction(WarmdownFractionParams(warmdown_frac=0.5), iterations=100, max_wallclock_seconds=600)
    assert isinstance(capped, BudgetAware)
    assert capped.lr_mul(0, 450_000.0) == pytest.approx(0.5)  # 450 s of 600
    capped.set_train_budget(train_budget_ms(600.0, 10.0))  # the cap less the 10 s GPTQ reserve: 590 s
    assert capped.lr_mul(0, 442_500.0) == pytest.approx(0.5)
    assert capped.lr_mul(0, 590_000.0) == 0.0
    off = WarmdownFraction(WarmdownFractionParams(warmdown_frac=0.0), iterations=10, max_wallclock_seconds=0)
    assert off.lr_mul(9, 0.0) == 1.0


def test_gptq_reserve_shortens_the_clock_and_makes_train_calibration_compliant():
    q = GPTQ(GPTQParams(calibration="train", reserve_seconds=10.0))
    assert isinstance(q, ReservesTrainTime) and q.train_time_reserve_s == 10.0
    assert train_time_reserve([object(), q]) == 10.0
    assert train_budget_ms(600.0, 10.0) == 590_000.0 and train_budget_ms(0.0, 10.0) is None
    (check,) = q.compliance
    assert check.ok and "inside the seconds reserved from the training clock" in check.reason and "10 s reserve" in check.reason
    (late,) = GPTQ(GPTQParams(calibration="train")).compliance
    assert not late.ok and "after the training clock" in late.reason
    assert GPTQ(GPTQParams()).train_time_reserve_s == 0.0


def test_score_once_windows_score_every_token_exactly_once():
    assert window_starts(100, 64, 32) == [0, 32, 64, 96]
    assert window_starts(100, 64, 32, score_once=True) == [0, 32, 64]
    spans = []
    for ws in window_starts(100, 64, 32, score_once=True):
        wlen = min(ws + 64, 100) - ws
        s = scored_offset(ws, wlen, 32, 64)
        spans += list(range(ws + s, ws + wlen))
    assert spans == list(range(100))
    assert scored_offset(64, 36, 32) == 4  # the #315 rule re-scores the clipped window's last 32


def test_embed_wd_gives_the_tables_their_own_adamw_decay(registry):
    from conftest import tiny_stack
    from pgolf_core.model.gpt import build_model
    from pgolf_core.train import build_slot

    stack = tiny_stack(registry, 'optimizer.adam_wd=0.02', 'optimizer.embed_wd=0.085', 'modifier=[{use="value_embedding", layers=[2, 3], dim=16}]')
    model, _ = build_model(stack, registry)
    runtime = type("R", (), {"compiled": staticmethod(lambda fn, **kw: fn)})()
    opts = build_slot(stack, registry, "optimizer")(model, runtime).optimizers
    tok, scalar = opts[0], opts[-1]
    assert isinstance(tok, torch.optim.AdamW) and [g["weight_decay"] for g in tok.param_groups] == [0.085, 0.085]
    assert len(tok.param_groups) == 2  # token table, value-embedding table
    assert isinstance(scalar, torch.optim.AdamW) and scalar.param_groups[0]["weight_decay"] == 0.02
    same = tiny_stack(registry, 'optimizer.adam_wd=0.02')
    opts = build_slot(same, registry, "optimizer")(build_model(same, registry)[0], runtime).optimizers
    assert opts[0].param_groups[0]["weight_decay"] == 0.02


def test_pr1218_stack_composes_trains_reserves_and_round_trips(registry, tmp_path):
    """The whole stack at a tiny size on the bundled sp4096 sample: builds, compiles fullgraph, trains 2 steps with a wallclock
    cap (the GPTQ reserve shortens the loop, the calibration reports against it), quantizes and round-trips."""
    from conftest import STACKS, tiny_stack
    from pgolf_core.logparse import parse_log
    from pgolf_core.model.gpt import build_model
    from pgolf_core.rundir import RunDir
    from pgolf_core.runtime import setup_runtime
    from pgolf_core.train import load_data, run_training

    stack = tiny_stack(
        registry, 'data.path="sample:sp4096"', 'data.tokenizer="sample:sp4096"', "model.vocab_size=4096", "data.train_batch_tokens=1024",
        'modifier.value_embedding.layers=[2, 3]', "modifier.value_embedding.dim=16", "modifier.partial_rope.rope_dims=8",
        "evaluator.eval_seq_len=64", "evaluator.stride=32", "evaluator.batch_seqs=64", "quantizer.calib_train_batches=2",
        "quantizer.keep_float_max_numel=1024", "averaging.decay=0.5", "run.max_wallclock_seconds=1000.0",
        "run.run_id='t'", f"run.out_dir='{tmp_path}'", path=STACKS / "pr1218.toml",
    )
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    assert model.topology.skip_gates.shape == (2, 64)
    x = torch.randint(0, 4096, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x, x), model(x, x))

    runtime = setup_runtime(stack)
    rundir = RunDir(str(tmp_path), "t", True, echo=False)
    rundir.open()
    summary = run_training(stack, registry, runtime, rundir, load_data(stack, runtime.device, registry))
    rundir.finish()
    text = (tmp_path / "t" / "log.txt").read_text()
    assert "clock:reserving 10s of the training clock for post-training work, effective=990000ms" in text
    assert "gptq:collecting hessians from 2 training batches (inside the 10 s reserved from the training clock)" in text
    assert "the 10000ms reserved from the training clock)" in text
    assert sorted(parse_log(text)["train_loss"]) == [1, 2]
    assert summary["compliant"] and set(summary["final"]) == {"final_int6_roundtrip", "final_int6_sliding_window"}
    blob = (tmp_path / "t" / "final_model.int6.ptz").read_bytes()
    import brotli

    assert brotli.decompress(blob)[:5] == b"BSHF\x02"
