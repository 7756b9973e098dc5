"""Techniques compose: each one toggled against the pr315 stack builds, trains 2 steps, compiles with
fullgraph=True, and round-trips its artifact; incompatible combinations are refused before training."""

from __future__ import annotations

import pytest
import torch

from conftest import STACKS, run_cli, tiny_stack
from pgolf_core.logparse import parse_log
from pgolf_core.model.gpt import build_model
from pgolf_core.rundir import RunDir
from pgolf_core.runtime import setup_runtime
from pgolf_core.train import load_data, run_training

PR315_MODIFIERS = ["bigram_hash", "smeargate", "partial_rope", "xsa", "ln_scale", "late_qat"]
FAST_EVAL = ["evaluator.eval_seq_len=64", "evaluator.stride=32", "evaluator.batch_seqs=64", "averaging.decay=0.5"]


def _without(name: str) -> list[str]:
    keep = [m for m in PR315_MODIFIERS if m != name]
    return ["modifier=[" + ", ".join(_stanza(m) for m in keep) + "]"]


def _stanza(name: str) -> str:
    return {
        "bigram_hash": '{use="bigram_hash", vocab_size=64, dim=16}',
        "smeargate": '{use="smeargate"}',
        "partial_rope": '{use="partial_rope", rope_dims=8}',
        "xsa": '{use="xsa", layers="last 2"}',
        "ln_scale": '{use="ln_scale"}',
        "late_qat": '{use="late_qat", threshold=0.9, mode="working"}',
        "canon": '{use="canon", layers="last 2", positions="ABCD"}',
        "catalytic_residuals": '{use="catalytic_residuals"}',
        "value_embedding": '{use="value_embedding", layers=[2, 3], dim=16}',
    }[name]


def _with(name: str) -> list[str]:
    return ["modifier=[" + ", ".join(_stanza(m) for m in [*PR315_MODIFIERS, name]) + "]"]


CASES = {
    **{f"-{m}": _without(m) for m in PR315_MODIFIERS},
    **{f"+{m}": _with(m) for m in ("canon", "catalytic_residuals", "value_embedding")},
    "averaging=swa": ['averaging={use="swa", every=1, start_scale=2.0}'],
    "averaging=tight_swa": ['averaging={use="tight_swa", every=1, start_scale=2.0, max_checkpoints=1}'],
    "averaging=none": ['averaging={use="none"}'],
    "quantizer=int6_percentile": ['quantizer={use="int6_percentile", keep_float_max_numel=1024}'],
    "quantizer=int8_rowwise": ['quantizer={use="int8_rowwise", keep_float_max_numel=1024}'],
    "compressor=zlib": ['compressor={use="zlib"}'],
    "evaluator=full_val": ['evaluator={use="full_val"}'],
    "init=baseline": ['init={use="baseline"}'],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_toggle_builds_trains_compiles_and_round_trips(registry, case, tmp_path):
    overrides = [*FAST_EVAL, *CASES[case]]
    if case.startswith("averaging="):
        overrides = [o for o in overrides if not o.startswith("averaging.")]
    if case.startswith("evaluator="):
        overrides = [o for o in overrides if not o.startswith("evaluator.")]
    stack = tiny_stack(registry, *overrides, "run.run_id='t'", f"run.out_dir='{tmp_path}'", path=STACKS / "pr315.toml")

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    x = torch.randint(0, 1024, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x, x), model(x, x))

    runtime = setup_runtime(stack)
    data = load_data(stack, runtime.device, registry)
    rundir = RunDir(str(tmp_path), "t", True, echo=False)
    rundir.open()
    summary = run_training(stack, registry, runtime, rundir, data)
    rundir.finish()
    log = parse_log((tmp_path / "t" / "log.txt").read_text())
    assert sorted(log["train_loss"]) == [1, 2]
    assert summary["bytes_model"] == (tmp_path / "t" / next(p.name for p in (tmp_path / "t").glob("*.ptz"))).stat().st_size
    for final in summary["final"].values():
        assert 0 < final["val_bpb"] < 10


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['modifier=[{use="smeargate"}, {use="smeargate"}]'], "both install 'smeargate' at embedding site 'x0'"),
        (['modifier=[{use="xsa", layers="last 2"}, {use="xsa", layers=[3]}]'], "both install 'xsa' at layer 3 attention site 'heads_out'"),
        (['modifier=[{use="value_embedding", layers=[1]}, {use="value_embedding", layers=[2]}]'], "both add the model-level module 've_shared'"),
        (['modifier=[{use="partial_rope", rope_dims=40}]'], "rope_dims=40 must be even and <= head dim 16"),
        (['modifier=[{use="canon", positions="AX"}]'], "positions must be letters from ABCD"),
        (['modifier=[{use="late_qat", mode="sometimes"}]'], "mode must be one of 'working', 'inert'"),
    ],
)
def test_incompatible_combinations_are_refused_by_validate(tmp_path, overrides, message):
    args = ["validate", str(STACKS / "pr315.toml"), "--set", "model.num_layers=4", "--set", "model.model_dim=64", "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2"]
    for o in overrides:
        args += ["--set", o]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and "Traceback" not in proc.stderr
