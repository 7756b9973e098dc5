"""``pgolf bench-gptq``: GPTQ's post-training phases timed on a stack's model, per KV-cache mode."""

from __future__ import annotations

import json

from pgolf_core.cli import main

TINY = ["model.num_layers=4", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "modifier[2].rope_dims=8", "modifier[2].ntk_seq_len=8", "modifier[5].layers=[2, 3]"]


def test_bench_gptq_times_each_mode_and_writes_json(tmp_path, capsys):
    sets = [a for s in TINY for a in ("--set", s)]
    out_json = tmp_path / "b.json"
    code = main(["bench-gptq", "pr1319", *sets, "--device", "cpu", "--seqs", "2", "--seq-len", "12", "--json", str(out_json)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("bench-gptq ") and "seqs:2 seq_len:12 gen_batch:4 kv_cache_check:ok" in out[0]
    assert [line.split()[1] for line in out[1:4]] == ["kv_cache:off", "kv_cache:exact", "kv_cache:approximate"]
    assert out[4].startswith("hessians ") and out[5].startswith("gptq ")
    data = json.loads(out_json.read_text())
    assert set(data["generate_s"]) == {"off", "exact", "approximate"} and data["gptq_matrices"] >= 0
    assert all(v > 0 for v in data["generate_s"].values())


def test_bench_gptq_refuses_a_stack_without_gptq_and_bad_modes(capsys):
    assert main(["bench-gptq", "baseline", "--device", "cpu"]) == 2
    assert "quantizer is 'int8_rowwise'; bench-gptq times the 'gptq' quantizer" in capsys.readouterr().err
    assert main(["bench-gptq", "pr1319", "--kv-cache", "fast"]) == 2
    assert "--kv-cache fast: expected a comma list of exact, approximate, off" in capsys.readouterr().err
