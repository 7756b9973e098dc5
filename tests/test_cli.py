"""The CLI as a user meets it: list, show, validate, config, stacks, and a full run on the sample data."""

from __future__ import annotations

import json

from conftest import STACKS, run_cli
from pgolf_core.logparse import parse_log


def test_list_groups_techniques_by_slot_with_distribution(tmp_path):
    proc = run_cli(["list"], tmp_path)
    assert proc.returncode == 0
    out = proc.stdout
    assert "optimizer:\n  muon" in out and "pgolf 0.1.0" in out
    data = json.loads(run_cli(["list", "--json", "--slot", "compressor"], tmp_path).stdout)
    assert {t["name"] for t in data["techniques"]} == {"zlib", "zstd", "brotli", "lzma", "byte_shuffle"}
    assert all(t["distribution"] == "pgolf" for t in data["techniques"])


def test_show_prints_parameters_with_types_defaults_and_env(tmp_path):
    proc = run_cli(["show", "muon"], tmp_path)
    assert proc.returncode == 0
    assert "matrix_lr: float = 0.04" in proc.stdout and "env MATRIX_LR" in proc.stdout
    assert "example:" in proc.stdout
    bad = run_cli(["show", "muonn"], tmp_path)
    assert bad.returncode == 2 and "did you mean 'muon'?" in bad.stderr


def test_validate_reports_the_reference_parameter_count(tmp_path):
    proc = run_cli(["validate", str(STACKS / "baseline.toml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model_params:17059912" in proc.stdout  # the official baseline's 9x512 model
    named = run_cli(["validate", "baseline", "--set", "model.num_layers=4"], tmp_path)
    assert named.returncode == 0 and "model_params:" in named.stdout


def test_config_prints_the_resolved_stack(tmp_path):
    proc = run_cli(["config", str(STACKS / "sample.toml"), "--set", "optimizer.matrix_lr=0.02"], tmp_path)
    assert proc.returncode == 0
    assert "matrix_lr = 0.02" in proc.stdout and 'path = "sample:sp1024"' in proc.stdout
    assert "# --set optimizer.matrix_lr=0.02" in proc.stdout
    as_json = json.loads(run_cli(["config", str(STACKS / "sample.toml"), "--format", "json"], tmp_path).stdout)
    assert as_json["optimizer"]["use"] == "muon" and as_json["model"]["num_layers"] == 4


def test_sample_stack_runs_end_to_end(tmp_path):
    proc = run_cli(["run", "sample", "--run-id", "demo", "--set", "run.iterations=6", "--set", "run.val_loss_every=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "demo"
    log = (run_dir / "log.txt").read_text()
    got = parse_log(log)
    assert sorted(got["train_loss"]) == [1, 2, 3, 4, 5, 6]
    assert got["train_loss"][6] < got["train_loss"][1]
    assert sorted(got["val"]) == [0, 3, 6]
    (final,) = got["finals"]
    assert final == "final_int8_zlib_roundtrip_exact"
    assert "Total submission size int8+zlib:" in log
    sub = json.loads((run_dir / "submission.json").read_text())
    assert set(sub) == {"author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code"}
    assert sub["val_bpb"] == round(got["finals"][final][1], 8) or abs(sub["val_bpb"] - got["finals"][final][1]) < 1e-8
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [m["kind"] for m in metrics]
    assert kinds.count("train") == 6 and kinds.count("final") == 1
    assert [m for m in metrics if m["kind"] == "final"][0]["name"] + "_exact" == final
    assert "[optimizer]" in (run_dir / "stack.toml").read_text()


def test_over_the_cap_fails_clearly_and_leaves_no_complete_run(tmp_path):
    proc = run_cli(["run", "sample", "--run-id", "big", "--set", "run.iterations=1", "--set", "run.artifact_cap_bytes=1000"], tmp_path)
    assert proc.returncode == 3
    assert "over the 1000-byte cap" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "big").exists()
    failed = tmp_path / "runs" / "big.failed"
    assert not (failed / "final_model.int8.ptz").exists() and "run_failed:" in (failed / "log.txt").read_text()


def test_bad_data_fails_before_anything_is_written(tmp_path):
    proc = run_cli(["run", "sample", "--set", f'data.path="{tmp_path / "missing"}"'], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.path ")
    assert not (tmp_path / "runs").exists()


def test_batch_geometry_error_at_launch_is_one_line(tmp_path):
    proc = run_cli(["run", "sample", "--set", "run.grad_accum_base=3"], tmp_path)
    assert proc.returncode == 2 and "not divisible" in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_module_entry_two_processes(tmp_path):
    """`torchrun -m pgolf run STACK` (no launcher of ours): ranks agree on the run id, rank 0 writes."""
    import subprocess
    import sys

    from conftest import run_cli  # noqa: F401  (same environment policy as the CLI tests)

    env = {"PATH": __import__("os").environ["PATH"], "PGOLF_CACHE": str(tmp_path / ".cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgolf", "run", "sample",
           "--set", "run.iterations=2", "--set", "run.warmup_steps=0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # beside runs/ledger.jsonl
    log = (run_dir / "log.txt").read_text()
    assert "world_size:2 grad_accum_steps:4" in log and "final_int8_zlib_roundtrip_exact" in log
