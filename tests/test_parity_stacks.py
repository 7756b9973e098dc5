"""Acceptance: the seed stacks reproduce their reference scripts' tiny CPU runs (tests/data/parity)."""

from __future__ import annotations

import sys

import pytest

import re

from conftest import FIXTURE_1024, FIXTURE_4096, FIXTURE_8192, STACKS, TOKENIZER_1024, TOKENIZER_4096, TOKENIZER_8192, legacy_env, parity_case, run_cli
from pgolf_core.logparse import parse_log

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRAIN_TOL = 2e-3
VAL_TOL = 1e-3
# Once late QAT rounds every weight to its int6 grid, a last-bit difference in a CPU kernel (AVX2 vs AVX-512,
# measured: pr315 2.5e-3 and pr450 3.1e-3 at step 23 with AVX-512, 1.4e-3 with AVX2) flips some roundings and the
# trajectories drift apart a little faster than before. Steps after the reference's ``late_qat:enabled`` line are
# compared at these tolerances; everything before it, and every stack without QAT, at the ones above.
TRAIN_TOL_AFTER_QAT = 5e-3
VAL_TOL_AFTER_QAT = 2e-3
QAT_SWITCH = re.compile(r"late_qat:enabled step:(\d+)")

# The reference runs were eager, so their late-QAT switch took effect; the stacks default to "inert",
# which is what the compiled published runs did.
# pr1392_tiny_8proc: PR #1392's Parallel Muon at world size 8 (gloo), 4 steps; how it was made: tests/data/parity/README.md.
CASES = [
    ("pr315", "pr315_tiny_a"), ("pr400", "pr400_tiny_a"), ("pr450", "pr450_tiny_a"),
    ("pr1019", "pr1019_tiny_a"), ("pr1392", "pr1392_tiny_a"), ("pr1319", "pr1319_tiny_a"),
    ("pr1392", "pr1392_tiny_8proc"), ("pr1218", "pr1218_tiny_a"), ("pr1218", "pr1218_tiny_2proc"),
    ("pr1285", "pr1285_tiny_a"), ("pr1285", "pr1285_tiny_2proc"),
    ("pr1394", "pr1394_tiny_1proc"), ("pr1394", "pr1394_tiny_2proc"),
    ("pr1493", "pr1493_tiny_1proc"), ("pr1493", "pr1493_tiny_2proc"),
]
# Variables the reference left at its script's default where the stack carries the record's run command:
# #1493's script defaults QK_GAIN_INIT to 5.0, its README's run sets 5.25 (stacks/pr1493.toml), its references 5.0.
CASE_ENV = {"pr1493": {"QK_GAIN_INIT": "5.0"}}
CASE_IDS = [case.replace("_tiny_a", "").replace("_tiny_1proc", "").replace("_tiny_", "_") for _, case in CASES]

# Reference event lines that carry each project's own sizes, or numbers the reference mislabels (its
# calibration line hard-codes "2048 tokens"; #1319 prints GPTQ_CALIB_BATCHES, which it only uses as a switch,
# and its unused recurrence settings), are not compared; DIAGNOSTIC lines are compared numerically.
SKIPPED_EVENTS = (
    "Total submission size", "Serialized model", "Code size", "gptq:building non-banked", "gptq:generating autoregressive",
    "gptq:calibrating batches", "depth_recurrence:layers=", "selective_prune: ",
    # #1218 counts only the Hessians it hooks (mlp/attn linears above 65,536 elements); pgolf collects every linear's.
    "GPTQ:collected", "GPTQ quantization:",
    # #1285 primes its recurrence graph in extra warmup steps that are rolled back (pgolf repeats no compile
    # priming), and ranks matrices for int5/int6 although N_INT6_LAYERS=66 keeps every one int6 (no weight changes).
    "recurrence:prewarm", "mixed_quant:",
    # The SP8192 records (#1394, #1493): data facts pgolf logs in its own words (train_loader:/val lines), the
    # rolled-back warmup with the loop on (compile priming, not repeated), and the quantizer's routing, which
    # tests/test_techniques_sp8192.py checks against these very lines.
    "train_shards:", "val_tokens:", "loop_warmup:enabled", "GPTQ:collecting Hessians", "Quantized weights:", "  gptq (", "  passthrough (",
    "ttt:start chunks=",  # #1493's TTT banner (its settings are the legacy env's, its result the quantized_ttt final)
)
# The SP8192 records label their final lines; pgolf's names for the same evaluations. Their pre-quantization line
# is compared with pgolf's 4-decimal DIAGNOSTIC line.
FINAL_NAMES = {
    "quantized": "final_int6_roundtrip_exact", "quantized_sliding_window": "final_int6_sliding_window_exact",
    "quantized_ttt": "final_int6_ttt_exact",
}
PRE_QUANT = "pre-quantization post-ema"
DIAGNOSTIC = re.compile(r"DIAGNOSTIC (\S+) val_loss:([0-9.]+) val_bpb:([0-9.]+)")


def _check_event(event: str, log: str) -> None:
    lines = log.splitlines()
    m = DIAGNOSTIC.match(event)
    if m:
        got = [DIAGNOSTIC.match(line) for line in lines]
        got = [g for g in got if g and g.group(1) == m.group(1)]
        assert got, f"missing event line {event!r}"
        assert (float(got[0].group(2)), float(got[0].group(3))) == pytest.approx((float(m.group(2)), float(m.group(3))), abs=VAL_TOL)
        return
    if event.startswith("selective_prune: already fits"):
        assert any(line.startswith(event) for line in lines), f"missing event line {event!r}"
        return
    if event.startswith(SKIPPED_EVENTS):
        return
    if event.startswith("gptq:done layers="):
        event = event.split(" time=")[0]
    assert any(line.startswith(event) for line in lines), f"missing event line {event!r}"


def _working_qat(stack: str) -> list[str]:
    data = tomllib.loads((STACKS / f"{stack}.toml").read_text())
    mods = data.get("modifier", [])
    return [f'modifier[{i}].mode="working"' for i, m in enumerate(mods) if m.get("use") == "late_qat"]


@pytest.mark.parametrize("stack, case", CASES, ids=CASE_IDS)
def test_stack_matches_reference(stack, case, tmp_path):
    if not (STACKS / f"{stack}.toml").exists():
        pytest.fail(f"stacks/{stack}.toml is missing")
    ref = parity_case(stack, case)
    args = ["run", str(STACKS / f"{stack}.toml"), "--legacy-env", "--run-id", case, "--nproc-per-node", str(ref["nproc"])]
    for expr in _working_qat(stack):
        args += ["--set", expr]
    sp4096 = ref["env"].get("vocab_size") == "4096"
    sp8192 = "fixture_sp8192" in ref["conditions"]
    data, tok = (FIXTURE_8192, TOKENIZER_8192) if sp8192 else (FIXTURE_4096, TOKENIZER_4096) if sp4096 else (FIXTURE_1024, TOKENIZER_1024)
    env = legacy_env(ref, data, tok)
    env.update(CASE_ENV.get(stack, {}))
    env["OMP_NUM_THREADS"] = "1"
    proc = run_cli(args, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "runs" / case / "log.txt").read_text()
    got = parse_log(log)
    assert got["params"] == ref["params"]
    switch = next((int(m.group(1)) for m in map(QAT_SWITCH.match, ref["events"]) if m), None)
    for step, loss in ref["train_loss"].items():
        tol = TRAIN_TOL_AFTER_QAT if switch is not None and int(step) > switch else TRAIN_TOL
        assert got["train_loss"][int(step)] == pytest.approx(loss, abs=tol), f"train_loss at step {step}"
    for step, (loss, bpb) in ref["val"].items():
        tol = VAL_TOL_AFTER_QAT if switch is not None and int(step) > switch else VAL_TOL
        assert got["val"][int(step)] == pytest.approx((loss, bpb), abs=tol), f"val at step {step}"
    finals = {FINAL_NAMES.get(name, name): value for name, value in ref["finals"].items() if name != PRE_QUANT}
    assert set(got["finals"]) == set(finals)
    for name, (loss, bpb) in finals.items():
        assert got["finals"][name] == pytest.approx((loss, bpb), abs=VAL_TOL), name
    if PRE_QUANT in ref["finals"]:
        loss, bpb = ref["finals"][PRE_QUANT]
        _check_event(f"DIAGNOSTIC post_ema val_loss:{loss:.4f} val_bpb:{bpb:.4f}", log)
    for event in ref["events"]:
        _check_event(event, log)


@pytest.mark.parametrize(
    "stack, params",
    [("pr315", 26_829_913), ("pr400", 26_845_283), ("pr450", 30_416_484), ("pr1019", 27_067_484), ("pr1392", 34_400_347), ("pr1319", 27_067_484), ("pr1218", 34_401_371), ("pr1285", 34_401_371), ("pr1394", 35_943_512), ("pr1493", 35_944_536)],
)
def test_validate_reports_the_reference_parameter_count(stack, params, tmp_path):
    proc = run_cli(["validate", str(STACKS / f"{stack}.toml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"model_params:{params}" in proc.stdout
    compliance = proc.stdout.split("compliance (the challenge's rules")[1]
    assert "final_int6_sliding_window ok - each validation token is scored by the frozen model" in compliance
    if stack == "pr1319":  # SLOT scores tokens it was optimised on: reported, and said to be outside the rules
        assert "final_slot NOT_COMPLIANT - optimises per-window parameters on the very tokens it then scores" in compliance
    if stack in ("pr1019", "pr1392", "pr1319"):
        assert "gptq calibration data ok - sequences the trained model generates itself" in compliance
    if stack in ("pr1218", "pr1285", "pr1394", "pr1493"):  # training batches, read inside the 10 s (12 s) taken off the training clock
        assert "gptq calibration data ok - training batches read inside the seconds reserved from the training clock" in compliance
