"""``pgolf bench`` and ``pgolf config --as-env``: the numbers a benchmark reports, the FLOPs formula, the
reference environment's round trip through ``--legacy-env``, and the side-by-side run of a reference script
(a small stand-in that prints the challenge's log lines, since the real scripts need CUDA)."""

from __future__ import annotations

import json
import math
import shlex
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STACKS

from pgolf_core.bench import (
    BenchError,
    FlopsEstimate,
    PgolfRow,
    ReferenceRow,
    compare,
    estimate_flops,
    format_report,
    loss_band,
    make_val_slice,
    parse_reference_log,
    run_reference,
)
from pgolf_core.cli import main
from pgolf_core.config import load_stack
from pgolf_core.config.dump import stack_to_dict
from pgolf_core.data import HEADER_BYTES, read_shard_header
from pgolf_core.envexport import format_env_value, stack_to_env
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique
from pgolf.testing import fresh_registry
from pgolf_core.model.gpt import build_model
from pgolf_core.train import resolve_data_paths

# Tiny and quick on CPU: one micro-batch of 1024 tokens per step.
TINY = ["--set", "run.grad_accum_base=1", "--set", "data.train_batch_tokens=1024"]

FAKE_REFERENCE = textwrap.dedent(
    """
    import json, os, sys, time
    n = int(os.environ["ITERATIONS"])
    seen = {k: v for k, v in os.environ.items() if k.isupper()}
    seen["CWD"] = os.getcwd()
    val = os.path.join(os.environ.get("DATA_PATH", ""), "fineweb_val_000000.bin")
    seen["VAL_TOKENS"] = open(val, "rb").read(12)[8:12].hex() if os.path.exists(val) else None
    json.dump(seen, open(os.environ["FAKE_OUT"], "w"))
    if os.environ.get("FAKE_FAIL"):
        print("Traceback: boom")
        sys.exit(3)
    print("logs/pgolf_bench_reference.txt")
    for s in range(1, n + 1):
        print(f"step:{s}/{n} train_loss:{7 - 0.25 * s:.4f} train_time:{25 * s}ms step_avg:{25.0:.2f}ms")
    print(f"step:{n}/{n} val_loss:6.5000 val_bpb:3.9000 train_time:{25 * n}ms step_avg:25.00ms")
    print("peak memory allocated: 200 MiB reserved: 220 MiB")
    sys.stdout.flush()
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    print("final_int8_zlib_roundtrip val_loss:6.6000 val_bpb:3.9500 eval_time:40ms")
    print("final_int8_zlib_roundtrip_exact val_loss:6.60000000 val_bpb:3.95000000")
    """
)


@pytest.fixture
def fake_reference(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_REFERENCE)
    return script


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# -- the benchmark through the CLI ------------------------------------------------------------------------------
def test_bench_against_a_reference_reports_both_rows_and_the_ratio(tmp_path, fake_reference, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out_json, seen_env = tmp_path / "bench.json", tmp_path / "env.json"
    argv = ["bench", str(STACKS / "sample.toml"), "--steps", "3", "--warmup-steps", "1", *TINY, "--peak-tflops", "1"]
    argv += ["--eval", "--val-tokens", "1100", "--json", str(out_json), "--reference", str(fake_reference)]
    argv += ["--reference-env", f"FAKE_OUT={seen_env}", "--reference-env", "EXTRA_KNOB=on"]
    assert main(argv) == 0
    text = capsys.readouterr().out

    # Nothing lands in the working directory; the reference ran in a temporary one that is gone.
    assert list(cwd.iterdir()) == []
    env = json.loads(seen_env.read_text())
    assert not Path(env["CWD"]).exists()

    # The reference got the stack's variables, the benchmark's fixed ones and the extra ones.
    assert env["ITERATIONS"] == "3" and env["WARMUP_STEPS"] == "1"
    assert env["MAX_WALLCLOCK_SECONDS"] == "0" and env["VAL_LOSS_EVERY"] == "0" and env["TRAIN_LOG_EVERY"] == "1"
    assert env["NUM_LAYERS"] == "4" and env["MODEL_DIM"] == "64" and env["TRAIN_BATCH_TOKENS"] == "1024"
    assert env["MLP_MULT"] == "2" and env["TIE_EMBEDDINGS"] == "1" and env["EXTRA_KNOB"] == "on"
    # ... on the same shards pgolf read: the fixed validation slice, exactly --val-tokens long.
    data = Path(env["DATA_PATH"])
    assert data.is_absolute() and Path(env["TOKENIZER_PATH"]).is_absolute()
    assert env["VAL_TOKENS"] == (1100).to_bytes(4, "little").hex()  # the header's token count
    assert not data.exists()  # the slice was temporary too

    report = json.loads(out_json.read_text())
    pg, ref, ratio = report["pgolf"], report["reference"], report["ratio"]
    s = pg["step_ms"]
    assert all(_finite_positive(s[k]) for k in ("median", "mean", "p10", "p90", "min", "max"))
    assert s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"]
    assert len(pg["step_ms_all"]) == 3 and len(pg["train_loss"]) == 3
    assert all(math.isfinite(x) for x in pg["train_loss"])
    assert pg["tokens_per_s"] == pytest.approx(1024 / (s["median"] / 1000))
    assert _finite_positive(pg["warmup_s"]) and pg["warmup_steps"] == 1
    assert _finite_positive(pg["peak_mem_mib"]) and pg["peak_mem_kind"] == "max_rss"
    flops = report["flops"]
    assert flops["per_token"] == 6 * flops["n_matmul"] + 6 * 4 * 128 * 64 and flops["formula"] == "6*N_matmul + 6*L*T*d_attn"
    assert pg["mfu"] == pytest.approx(flops["per_token"] * pg["tokens_per_s"] / 1e12)
    (ev,) = pg["eval"]
    assert ev["name"] == "final_int8_zlib_roundtrip" and _finite_positive(ev["eval_ms"]) and _finite_positive(ev["val_bpb"])

    assert ref["step_avg_ms"] == 25.0 and ref["steps"] == 3
    assert ref["step_ms"]["median"] == 25.0
    assert ref["train_loss"] == [6.75, 6.5, 6.25]
    assert ref["peak_mem_mib"] == 200.0
    assert ref["eval"] == [{"name": "final_int8_zlib_roundtrip", "val_loss": 6.6, "val_bpb": 3.95, "eval_ms": 40.0}]
    assert ratio["step_avg"] == pytest.approx(s["mean"] / 25.0)
    assert ratio["step_median"] == pytest.approx(s["median"] / 25.0)
    assert ratio["peak_mem"] is None  # CPU RSS is not comparable with the CUDA allocator's peak
    assert ratio["eval"]["final_int8_zlib_roundtrip"] == pytest.approx(ev["eval_ms"] / 40.0)

    assert "6*N_matmul + 6*L*T*d_attn = 6*180224 + 6*4*128*64" in text
    assert "MFU" in text and "%" in text
    assert f"ratio pgolf/reference: step_avg {ratio['step_avg']:.3f}" in text
    assert "reference eval final_int8_zlib_roundtrip eval_time 40 ms vs pgolf" in text


def test_bench_argument_errors_are_one_line(tmp_path, capsys):
    sample = str(STACKS / "sample.toml")
    assert main(["bench", sample, "--steps", "0"]) == 2
    assert main(["bench", sample, "--reference", str(tmp_path / "missing.py")]) == 2
    assert main(["bench", sample, "--peak-tflops", "-3"]) == 2
    assert main(["bench", sample, "--reference-env", "no equals sign"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: --steps 0: must be >= 1",
        f"error: --reference {tmp_path / 'missing.py'}: file not found",
        "error: --peak-tflops -3.0: must be a positive number",
        "error: --reference-env no equals sign: expected NAME=VALUE",
    ]


def test_bench_under_two_processes_reports_the_world(tmp_path, capsys):
    """The launcher relaunches the benchmark under torchrun and reports rank 0's row with the whole world's tokens."""
    out_json = tmp_path / "b.json"
    argv = ["bench", str(STACKS / "sample.toml"), "--steps", "1", "--warmup-steps", "0", "--nproc-per-node", "2"]
    argv += ["--set", "data.train_batch_tokens=1024", "--json", str(out_json)]
    assert main(argv) == 0
    row = json.loads(out_json.read_text())["pgolf"]
    assert row["world_size"] == 2 and row["grad_accum_steps"] == 4
    assert _finite_positive(row["step_ms"]["median"]) and len(row["train_loss"]) == 1
    assert "2 process(es) x 4 micro-batches" in capsys.readouterr().out


# -- FLOPs ------------------------------------------------------------------------------------------------------
def test_flops_per_token_on_a_known_tiny_model(registry):
    """4 layers, width 64, 4 heads / 2 KV heads (head dim 16), MLP x2, vocabulary 1024, sequence 128."""
    stack = load_stack(STACKS / "sample.toml", registry)
    with torch.device("meta"):
        model, _ = build_model(stack, registry)
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 128 * 64  # q, k, v, out, fc, proj
    f = estimate_flops(model, stack)
    assert f.n_linear == 4 * per_layer == 114688
    assert f.n_tied_head == 1024 * 64
    assert f.per_token == 6 * (114688 + 65536) + 6 * 4 * 128 * 64 == 1277952
    assert f.expression() == "6*180224 + 6*4*128*64"

    untied = load_stack(STACKS / "sample.toml", registry, overrides=["model.tie_embeddings=false"])
    with torch.device("meta"):
        model, _ = build_model(untied, registry)
    g = estimate_flops(model, untied)
    assert g.n_tied_head == 0 and g.n_linear == 114688 + 1024 * 64  # the untied head is an nn.Linear
    assert g.per_token == f.per_token


def test_mfu_needs_a_peak_and_uses_the_median_step():
    flops = FlopsEstimate(n_linear=1000, n_tied_head=24, num_layers=2, seq_len=8, attn_width=4)
    assert flops.per_token == 6 * 1024 + 6 * 2 * 8 * 4
    row = PgolfRow(
        step_ms=[10.0, 20.0, 20.0, 30.0, 100.0], train_loss=[1.0] * 5, warmup_s=2.0, warmup_steps=4, train_batch_tokens=4000,
        world_size=2, grad_accum_steps=4, device="cuda", device_name="GPU", dtype="bf16", compile=True,
        peak_mem_mib=1000.0, peak_mem_kind="cuda_max_allocated", flops=flops, peak_tflops=None,
    )
    assert row.mfu is None and "MFU           n/a" in format_report("s.toml", row, 5, None, None)
    assert row.tokens_per_s == pytest.approx(4000 / 0.020)
    assert row.compile_estimate_s == pytest.approx(2.0 - 4 * 0.020)
    row.peak_tflops = 1e-6
    assert row.mfu == pytest.approx(flops.per_token * 200000 / (1e6 * 2))


# -- the reference side -----------------------------------------------------------------------------------------
def _ref_row(step_avg: float, step_ms: list[float], peak: float | None, evals: list[dict]) -> ReferenceRow:
    return ReferenceRow("ref.py", ["python", "ref.py"], len(step_ms), step_avg, step_ms, {}, peak, None, evals, {})


def test_ratio_math():
    flops = FlopsEstimate(1, 0, 1, 1, 1)
    row = PgolfRow(
        step_ms=[40.0, 50.0, 60.0], train_loss=[3.0] * 3, warmup_s=1.0, warmup_steps=1, train_batch_tokens=100, world_size=1,
        grad_accum_steps=8, device="cuda", device_name="GPU", dtype="bf16", compile=True, peak_mem_mib=1050.0,
        peak_mem_kind="cuda_max_allocated", flops=flops, peak_tflops=989.0,
        eval=[{"name": "final_x", "eval_ms": 300.0}, {"name": "final_only_pgolf", "eval_ms": 1.0}],
    )
    ref = _ref_row(48.0, [45.0, 48.0, 51.0], 1000.0, [{"name": "final_x", "eval_ms": 200.0}])
    r = compare(row, ref)
    assert r["step_avg"] == pytest.approx(50.0 / 48.0)
    assert r["step_median"] == pytest.approx(50.0 / 48.0)
    assert r["peak_mem"] == pytest.approx(1.05)
    assert r["eval"] == {"final_x": pytest.approx(1.5)}
    row.peak_mem_kind = "max_rss"
    assert compare(row, ref)["peak_mem"] is None


def test_reference_log_parsing():
    log = "\n".join(
        [
            "step:0/3 val_loss:7.0 val_bpb:4.0 train_time:0ms step_avg:0.00ms",
            "step:1/3 train_loss:6.9000 train_time:120ms step_avg:120.00ms",
            "step:2/3 train_loss:6.8000 train_time:170ms step_avg:85.00ms",
            "step:3/3 train_loss:6.7000 train_time:222ms step_avg:74.00ms",
            "peak memory allocated: 30123 MiB reserved: 31000 MiB",
            "final_int6_sliding_window val_loss:2.0 val_bpb:1.2 stride:64 eval_time:98765ms",
        ]
    )
    got = parse_reference_log(log, 3)
    assert got["step_avg_ms"] == 74.0 and got["step_ms"] == [120.0, 50.0, 52.0]
    assert got["train_loss"] == {1: 6.9, 2: 6.8, 3: 6.7}
    assert (got["peak_mem_mib"], got["peak_reserved_mib"]) == (30123.0, 31000.0)
    assert got["eval"] == [{"name": "final_int6_sliding_window", "val_loss": 2.0, "val_bpb": 1.2, "eval_ms": 98765.0}]
    with pytest.raises(BenchError, match="logged up to step 3, not 5"):
        parse_reference_log(log, 5)
    with pytest.raises(BenchError, match="printed no 'step:N/M train_loss"):
        parse_reference_log("hello\n", 3)


def test_reference_is_stopped_after_training_and_failures_are_reported(tmp_path, fake_reference):
    out = tmp_path / "env.json"
    env = {"ITERATIONS": "4", "FAKE_OUT": str(out), "FAKE_SLEEP": "300"}
    t = time.monotonic()
    row = run_reference(fake_reference, env, 4, 1, wait_for_eval=False)
    assert time.monotonic() - t < 120  # it did not sit out the 300 s after its peak-memory line
    assert row.step_avg_ms == 25.0 and row.peak_mem_mib == 200.0 and row.eval == []
    assert row.command == [sys.executable, str(fake_reference)]

    with pytest.raises(BenchError, match=r"exited with status 3: Traceback: boom"):
        run_reference(fake_reference, {**env, "FAKE_FAIL": "1"}, 4, 1, wait_for_eval=False)


def test_val_slice_keeps_the_first_tokens_and_links_the_training_shards(tmp_path, registry):
    stack = load_stack(STACKS / "sample.toml", registry)
    data_path, _ = resolve_data_paths(stack)
    sliced = make_val_slice(data_path, 1000, tmp_path / "d")
    val = sliced / "fineweb_val_000000.bin"
    assert read_shard_header(val) == 1000
    original = min(Path(data_path).glob("fineweb_val_*.bin"))
    want = np.fromfile(original, dtype="<u2", offset=HEADER_BYTES)[:1000]
    assert np.array_equal(np.fromfile(val, dtype="<u2", offset=HEADER_BYTES), want)
    trains = sorted(sliced.glob("fineweb_train_*.bin"))
    assert trains and all(p.is_symlink() for p in trains)
    with pytest.raises(BenchError, match="has only"):
        make_val_slice(data_path, 10**9, tmp_path / "e")


def test_loss_band():
    refs = [[5.0, 4.0, 3.0], [5.2, 4.1, 3.3], [4.9, 4.3, 3.1]]
    inside = loss_band(refs, [5.0, 4.2, 3.2])
    assert inside["inside"] == 1.0 and inside["worst"] == 0.0
    out = loss_band(refs, [5.0, 4.5, 3.2])
    assert out["inside"] == pytest.approx(2 / 3) and out["worst"] == pytest.approx(0.2) and out["worst_step"] == 2
    with pytest.raises(BenchError):
        loss_band(refs[:1], [1.0])


# -- --as-env ---------------------------------------------------------------------------------------------------
def test_env_values_are_written_the_way_the_scripts_read_them():
    assert [format_env_value(v) for v in (True, False, 2.0, 0.04, 1e-8, -4.0, 7, (1, 2), "mlp,attn")] == [
        "1", "0", "2", "0.04", "1e-08", "-4", "7", "1,2", "mlp,attn",
    ]


def _as_env(stack_name: str, *sets: str, capsys) -> dict[str, str]:
    argv = ["config", stack_name, "--as-env"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.split("=", 1) for line in (shlex.split(line)[0] for line in lines))


@pytest.mark.parametrize("name", sorted(p.stem for p in STACKS.glob("*.toml")))
def test_as_env_round_trips_through_legacy_env(name, registry, capsys):
    stack = load_stack(STACKS / f"{name}.toml", registry)
    env = _as_env(name, capsys=capsys)
    back = load_stack(STACKS / f"{name}.toml", registry, legacy_env=env)
    assert stack_to_dict(back) == stack_to_dict(stack)
    assert back.legacy_env  # the variables were applied, not ignored
    assert env["NUM_LAYERS"] == str(stack.model.num_layers) and env["SEED"] == str(stack.run.seed)


# Changed values that only the environment carries back: applied on the unchanged stack, they must give the
# changed stack (so every emitted name and value is one --legacy-env reads the same way).
ABLATIONS = {
    "baseline": ["model.num_layers=7", "optimizer.matrix_lr=0.0123", "optimizer.adam_eps=1e-7", "model.tie_embeddings=false",
                 "mlp.mult=2.5", "run.seed=9", "data.train_seq_len=512"],
    "pr315": ["modifier[3].layers='last 2'", "averaging.decay=0.99", "evaluator.stride=32", "modifier[0].vocab_size=4096",
              "modifier[5].threshold=0.2", "quantizer.int6_categories='mlp'"],
    "pr400": ["modifier[5].layers=[1, 3]", "modifier[5].delta_gate=false", "modifier[5].delta_gate_init=-3.5",
              "averaging.every=25", "modifier[3].layers='last 3'", "optimizer.weight_decay=0.05"],
    "pr450": ["modifier[6].layers=[2, 5]", "modifier[6].dim=64", "model.num_layers=8", "averaging.start_scale=0.3"],
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_as_env_carries_changed_values_back(name, registry, capsys):
    changed = load_stack(STACKS / f"{name}.toml", registry, overrides=ABLATIONS[name])
    env = _as_env(name, *ABLATIONS[name], capsys=capsys)
    back = load_stack(STACKS / f"{name}.toml", registry, legacy_env=env)
    assert stack_to_dict(back) == stack_to_dict(changed)
    assert stack_to_dict(back) != stack_to_dict(load_stack(STACKS / f"{name}.toml", registry))


def test_as_env_layer_selectors_and_switches(registry):
    pr400 = load_stack(STACKS / "pr400.toml", registry)
    env = stack_to_env(pr400, registry).variables
    assert env["XSA_LAST_N"] == "4" and env["CANON_LAST_N"] == "5"
    assert env["CANON_FIRST_N"] == "0" and env["CANON_LAYERS"] == ""  # the competing selectors unset
    assert env["LN_SCALE"] == "1" and env["LATE_QAT"] == "1"
    assert env["CATALYTIC"] == "0" and env["VE_ENABLED"] == "0"  # installed, not in this stack
    assert env["MUON_WD"] == "0.04" and "MUON_WEIGHT_DECAY" not in env  # the first of the aliases
    assert "RUN_ID" not in env  # empty: the script picks its own
    pr450 = stack_to_env(load_stack(STACKS / "pr450.toml", registry), registry).variables
    assert pr450["VE_LAYERS"] == "9,10" and pr450["VE_ENABLED"] == "1" and pr450["CATALYTIC"] == "1"

    same_layers = stack_to_env(load_stack(STACKS / "pr400.toml", registry, overrides=["modifier[3].layers='all'"]), registry)
    assert same_layers.variables["XSA_LAST_N"] == "11"
    assert any("written as XSA_LAST_N=11" in n for n in same_layers.notes)
    no_variable = stack_to_env(load_stack(STACKS / "pr400.toml", registry, overrides=["modifier[4].layers='last 3'"]), registry)
    assert any("modifier[4](ln_scale): layers='last 3' has no reference variable" in n for n in no_variable.notes)


# PR #400's published run command (pr_report_canon_deltagate_11layer.md at the PR's head f4952b1b0cf9, "Final Run
# Command"), without the launcher's own variables (CUDA_VISIBLE_DEVICES, TORCHINDUCTOR_CACHE_DIR).
PR400_COMMAND = """
  RUN_ID=frontier_canon_ac_k3_8gpu_final_report_seed1336
  DATA_PATH=./data/datasets/fineweb10B_sp1024/
  TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model
  VOCAB_SIZE=1024 SEED=1336
  NUM_LAYERS=11 MODEL_DIM=512 NUM_HEADS=8 NUM_KV_HEADS=4 MLP_MULT=3.0
  TRAIN_SEQ_LEN=2048
  EVAL_SEQ_LEN=2048 EVAL_STRIDE=64 EVAL_BATCH_SEQS=32
  ITERATIONS=7000 WARMUP_STEPS=20 WARMDOWN_ITERS=3000 MAX_WALLCLOCK_SECONDS=600
  MATRIX_LR=0.025 SCALAR_LR=0.025 TIED_EMBED_LR=0.035
  MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 MUON_MOMENTUM_WARMUP_STEPS=1500
  MUON_WEIGHT_DECAY=0.04 ADAM_WEIGHT_DECAY=0.04
  EMA_ENABLED=0
  SWA_ENABLED=1 TIGHT_SWA=1 TIGHT_SWA_EVERY=50 TIGHT_SWA_START_LRMUL=0.2 TIGHT_SWA_MAX_CHECKPOINTS=12
  XSA_LAST_N=4 ROPE_DIMS=16 LN_SCALE=1
  LATE_QAT=1 QAT_THRESHOLD=0.1
  INT6_CATEGORIES=mlp,attn TRAIN_BATCH_TOKENS=786432 GRAD_CLIP_NORM=0.3
  CANON_SET=AC CANON_KERNEL=3 CANON_RESIDUAL=1 CANON_ACTIVATION=0 CANON_BIAS=0
  CANON_FIRST_N=0 CANON_LAST_N=5 CANON_DELTA_GATE=1 CANON_DELTA_GATE_INIT=-4.0
"""


def _env_aliases(registry) -> dict[str, str]:
    """Each declared alias of a variable -> the name --as-env writes (the first): one variable for the script,
    which reads either (PR #400's reads MUON_WEIGHT_DECAY, else MUON_WD)."""
    import attrs

    from pgolf_core.config.schema import CORE_TABLES
    from pgolf_core.envexport import env_names

    classes = list(CORE_TABLES.values()) + [r.technique.params for r in registry.all()]
    return {alias: names[0] for cls in classes for a in attrs.fields(cls) for names in [env_names(a)] for alias in names}


def _as_read(value: str):
    """A value as the script reads it: numbers by value (MLP_MULT=3.0 is 3), paths without a trailing slash."""
    try:
        return float(value)
    except ValueError:
        return value.rstrip("/")


def test_as_env_reproduces_pr400s_published_command(registry, capsys):
    command = dict(word.split("=", 1) for word in PR400_COMMAND.split())
    assert len(command) == 49
    env = _as_env("pr400", "run.seed=1336", f'run.run_id="{command["RUN_ID"]}"', capsys=capsys)
    aliases = _env_aliases(registry)
    got = {name: env.get(aliases.get(name, name)) for name in command}
    missing = [name for name, value in got.items() if value is None]
    assert not missing, f"variables of the command that --as-env does not write: {missing}"
    assert {name: _as_read(v) for name, v in got.items()} == {name: _as_read(v) for name, v in command.items()}


def test_as_env_writes_the_reference_spelling_of_mapped_values(registry):
    pr1392 = stack_to_env(load_stack(STACKS / "pr1392.toml", registry), registry)
    assert pr1392.variables["MUON_EQ_R"] == "1"  # row_equilibrate "bf16"
    fp32 = stack_to_env(load_stack(STACKS / "pr1392.toml", registry, overrides=['optimizer.row_equilibrate="fp32"']), registry)
    assert "MUON_EQ_R" not in fp32.variables
    assert any("optimizer(parallel_muon).row_equilibrate='fp32' has no MUON_EQ_R value (it takes 0, 1)" in n for n in fp32.notes)


def test_as_env_averaging_switches_and_start_layer(registry):
    def env(name, *overrides):
        return stack_to_env(load_stack(STACKS / f"{name}.toml", registry, overrides=list(overrides)), registry)

    switches = ("EMA_ENABLED", "SWA_ENABLED", "TIGHT_SWA")
    assert [env("baseline").variables[k] for k in switches] == ["0", "0", "0"]  # the #315 line's SWA default is on
    assert [env("pr315").variables[k] for k in switches] == ["1", "0", "0"]
    assert [env("pr400").variables[k] for k in switches] == ["0", "1", "1"]
    assert [env("pr450").variables[k] for k in switches] == ["0", "1", "0"]
    assert [env("pr1392").variables[k] for k in switches] == ["1", "1", "0"]  # the shadow SWA sums under SWA_ENABLED
    assert env("pr1392", "averaging.shadow_swa_every=0").variables["SWA_ENABLED"] == "0"

    pr1392 = env("pr1392")
    assert pr1392.variables["PARALLEL_START_LAYER"] == "7" and not any("parallel_residual" in n for n in pr1392.notes)
    same = env("pr1392", 'modifier.parallel_residual.layers="last 4"')
    assert same.variables["PARALLEL_START_LAYER"] == "7"
    assert any("layers='last 4' written as PARALLEL_START_LAYER=7" in n for n in same.notes)
    gap = env("pr1392", "modifier.parallel_residual.layers=[3, 5]")
    assert "PARALLEL_START_LAYER" not in gap.variables
    assert any("layers=[3, 5] (layers [3, 5]) is not expressible as PARALLEL_START_LAYER" in n for n in gap.notes)


class _AveragingWithoutSwitches:
    @staticmethod
    @hookimpl
    def pgolf_register_techniques(register) -> None:
        from pgolf.plugins.averaging.ema import EMA, EMAParams

        register(Technique(name="mine", slot="averaging", params=EMAParams, build=lambda p, ctx: EMA(p), summary="no switches"))


def test_as_env_notes_a_slot_technique_without_switches():
    registry = fresh_registry(_AveragingWithoutSwitches())
    stack = load_stack(STACKS / "pr315.toml", registry, overrides=['averaging.use="mine"'])
    out = stack_to_env(stack, registry)
    assert "EMA_ENABLED" not in out.variables
    assert any(n.startswith("averaging(mine): declares no reference switch among EMA_ENABLED / SWA_ENABLED / TIGHT_SWA") for n in out.notes)


def test_as_env_notes_go_to_stderr(capsys):
    assert main(["config", "pr400", "--as-env", "--set", "modifier[4].layers='last 3'"]) == 0
    captured = capsys.readouterr()
    assert "LN_SCALE=1" in captured.out.splitlines()
    assert captured.err.startswith("note: modifier[4](ln_scale)")
    assert all("=" in line for line in captured.out.splitlines())


def test_the_commands_in_docs_performance_parse():
    """Every ``pgolf …`` command line in docs/performance.md is one the CLI accepts, with bundled stack names."""
    import re

    from conftest import REPO

    from pgolf_core.cli import build_parser

    text = (REPO / "docs" / "performance.md").read_text()
    commands = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)  # environment prefix
            if words[:1] == ["pgolf"] and len(words) > 2 and not any(w.startswith("[") for w in words):  # not a synopsis
                commands.append(words[1:])
    benches = [c for c in commands if c[0] == "bench"]
    assert len(benches) >= 8
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)
    assert {c[1] for c in benches} - {"pr1392"} <= {p.stem for p in STACKS.glob("*.toml")}


def test_as_env_does_not_combine_with_diff_or_format(capsys):
    assert main(["config", "pr400", "--as-env", "--diff", "pr315"]) == 2
    assert main(["config", "pr400", "--as-env", "--format", "json"]) == 2
    assert capsys.readouterr().err.count("error: --as-env prints NAME=value lines") == 2
