"""Acceptance: stacks/baseline.toml reproduces the official train_gpt.py step for step (1 and 2 processes)."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURE_1024, STACKS, TOKENIZER_1024, legacy_env, parity_case, run_cli
from pgolf_core.logparse import parse_log

TRAIN_TOL = 2e-3
VAL_TOL = 1e-3


@pytest.mark.parametrize("case", ["tiny_a_1proc", "tiny_a_2proc"])
def test_baseline_matches_reference(case, tmp_path):
    ref = parity_case("baseline", case)
    args = ["run", str(STACKS / "baseline.toml"), "--legacy-env", "--run-id", case, "--nproc-per-node", str(ref["nproc"])]
    proc = run_cli(args, tmp_path, env=legacy_env(ref, FIXTURE_1024, TOKENIZER_1024))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / case
    got = parse_log((run_dir / "log.txt").read_text())

    assert got["params"] == ref["params"]
    assert sorted(got["train_loss"]) == sorted(int(s) for s in ref["train_loss"])
    for step, loss in ref["train_loss"].items():
        assert got["train_loss"][int(step)] == pytest.approx(loss, abs=TRAIN_TOL), f"train_loss at step {step}"
    for step, (loss, bpb) in ref["val"].items():
        assert got["val"][int(step)][0] == pytest.approx(loss, abs=VAL_TOL), f"val_loss at step {step}"
        assert got["val"][int(step)][1] == pytest.approx(bpb, abs=VAL_TOL), f"val_bpb at step {step}"
    for name, (loss, bpb) in ref["finals"].items():
        assert got["finals"][name][0] == pytest.approx(loss, abs=VAL_TOL)
        assert got["finals"][name][1] == pytest.approx(bpb, abs=VAL_TOL)

    # The run directory holds what the challenge asks for.
    names = {p.name for p in run_dir.iterdir()}
    assert {"log.txt", "metrics.jsonl", "stack.toml", "final_model.int8.ptz", "submission.json"} <= names
    submission = json.loads((run_dir / "submission.json").read_text())
    final_loss, final_bpb = ref["finals"]["final_int8_zlib_roundtrip_exact"]
    assert submission["val_bpb"] == pytest.approx(final_bpb, abs=VAL_TOL)
    assert submission["val_loss"] == pytest.approx(final_loss, abs=VAL_TOL)
    assert submission["bytes_total"] == submission["bytes_code"] + (run_dir / "final_model.int8.ptz").stat().st_size
    assert not list((tmp_path / "runs").glob("*.partial"))
