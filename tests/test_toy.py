"""``--toy``: every bundled stack at CPU toy size on the sample of its own vocabulary, switch points kept as
fractions of the run; the pr1392 toy run end to end, offline."""

from __future__ import annotations

import json

import attrs
import pytest

from conftest import STACKS, run_cli
from pgolf_core.config import load_stack
from pgolf_core.toy import RULES, Scale, load_toy_stack, rule_for, scale_value, toy_settings
from pgolf_core.train import build_slot

BUNDLED = sorted(p.stem for p in STACKS.glob("*.toml"))
SCALE = Scale(steps=40 / 20000, seq=128 / 2048, seqs=16 / 384, width=64 / 512, head_dim=16 / 64, toy_head_dim=16)


@pytest.mark.parametrize(
    "rule, value, expected",
    [
        ("steps", 3000, 6), ("steps", 50, 1), ("steps", 0, 0),  # at least one step; 0 (off) stays off
        ("seq", 2048, 128), ("seq", 64, 4), ("seq", 1024, 64),
        ("seqs", 128, 5), ("seqs", 64, 3),
        ("width", 128, 16), ("width", 112, 14), ("area", 65536, 1024),
        ("head_dim", 16, 4), ("head_dim", 0, 0), ("head_dim", 64, 16),  # even, at most the toy head dim
        ("horizon", 0.997, 0.0),  # a 333-step horizon is 0.67 of a 40-step toy: no averaging left
        ("keep", 3, 3), (4, 64, 4), (4, 2, 2),
    ],
)
def test_each_rule_scales_its_kind_of_number(rule, value, expected):
    assert scale_value(rule, value, SCALE) == expected and type(scale_value(rule, value, SCALE)) is type(value)


def test_an_ema_horizon_stays_a_fraction_of_the_run():
    # PR #315: decay 0.997 over 9000 iterations is a 333-step horizon, 3.7% of the run; 3.7% of 40 steps is 1.48 steps.
    scale = attrs.evolve(SCALE, steps=40 / 9000)
    assert scale_value("horizon", 0.997, scale) == pytest.approx(1 - 1 / (40 / 9000 / 0.003), abs=1e-6) == pytest.approx(0.325, abs=1e-3)
    assert scale_value("horizon", 0.9, attrs.evolve(SCALE, steps=1.0)) == pytest.approx(0.9)


def test_rules_come_from_metadata_then_unit_then_name(registry):
    def field(slot, name, key):
        return next(a for a in attrs.fields(registry.get(slot, name).technique.params) if a.name == key)

    assert rule_for(field("averaging", "ema", "decay")) == "horizon"  # declared: toy="horizon"
    assert rule_for(field("modifier", "canon", "kernel")) == "keep"  # unit tokens, but a conv length
    assert rule_for(field("modifier", "depth_recurrence", "start_step")) == "steps"  # unit
    assert rule_for(field("evaluator", "sliding_window", "stride")) == "seq"  # unit tokens
    assert rule_for(field("quantizer", "int8_rowwise", "keep_float_max_numel")) == "area"  # name
    assert rule_for(field("modifier", "bigram_hash", "dim")) == "width"  # name
    assert rule_for(field("optimizer", "muon", "matrix_lr")) == "keep"
    assert set(RULES) >= {"steps", "seq", "seqs", "width", "area", "head_dim", "horizon", "keep"}


def test_pr1392_toy_keeps_every_switch_as_a_fraction_of_the_run(registry):
    stack, notes = load_toy_stack(STACKS / "pr1392.toml", registry)
    assert notes == []
    r, d, m = stack.run, stack.data, stack.model
    assert (r.iterations, r.warmup_steps, r.max_wallclock_seconds, r.val_loss_every, r.train_log_every, r.grad_accum_base) == (40, 2, 0.0, 8, 1, 2)
    assert (d.path, d.tokenizer, d.train_seq_len, d.train_batch_tokens) == ("sample:sp4096", "sample:sp4096", 128, 2048)
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.vocab_size) == (11, 64, 4, 2, 4096)  # depth kept: selectors keep their layers
    mods = {mod.technique: mod for mod in stack.modifiers}
    assert mods["depth_recurrence"].params.start_step == 6 and mods["depth_recurrence"].layers == [4, 5]  # 3000 of 20000 -> 6 of 40
    assert (mods["partial_rope"].params.rope_dims, mods["partial_rope"].params.ntk_seq_len) == (4, 64)
    assert mods["value_embedding"].params.dim == 16 and mods["value_embedding"].layers == [9, 10]
    assert stack.params("schedule").warmdown_iters == 8  # 4000 of 20000
    avg, quant, ev = stack.params("averaging"), stack.params("quantizer"), stack.params("evaluator")
    assert (avg.decay, avg.shadow_swa_every) == (0.0, 1)
    assert (quant.calib_seqs, quant.keep_float_max_numel) == (5, 1024)  # 128 of 384 sequences a step -> 5 of 16
    assert (ev.eval_seq_len, ev.stride) == (128, 4)
    assert stack.params("optimizer").momentum_warmup_steps == 3  # unit "steps": 1500 of 20000
    # Not the published recipe: no author, no score, a name of its own; the toy's settings are recorded.
    assert (stack.meta.name, stack.meta.author, stack.meta.github_id, stack.meta.reported_val_bpb) == ("pr1392-toy", "", "", None)
    assert "modifier.depth_recurrence.start_step=6" in stack.toy and stack.overrides == ()


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_toy_is_buildable_and_small_and_a_toy_of_a_toy_is_itself(registry, name):
    from pgolf_core.cli.common import check_buildable
    from pgolf_core.model.gpt import count_parameters

    stack, _ = load_toy_stack(STACKS / f"{name}.toml", registry)
    model, _ = check_buildable(stack, registry)
    # The token table keeps the sample's vocabulary: the SP8192 stacks' toy table (8192 x 64 = 524,288) alone
    # takes half of the bound, so rows beyond 4,096 are not counted against it (unchanged for sp1024/sp4096).
    extra_rows = max(stack.model.vocab_size - 4096, 0) * stack.model.model_dim
    assert count_parameters(model) - extra_rows < 1_000_000
    assert stack.data.path.startswith("sample:sp") and stack.meta.author == "" and stack.meta.reported_val_bpb is None
    assert toy_settings(stack)[0] == []  # already toy: nothing more to shrink


def _fires(stack, registry) -> dict[str, int | None]:
    """The first step at which each switch of the stack happens, from its schedule and settings (no training)."""
    n = stack.run.iterations
    schedule = build_slot(stack, registry, "schedule")
    scales = [schedule.lr_mul(s, 0.0) for s in range(n)]  # at the start of step s (0-based)
    out: dict[str, int | None] = {}
    avg = stack.params("averaging")
    technique = stack.technique("averaging")
    if technique in ("swa", "tight_swa"):  # after the optimizer step: state.step is s + 1, the scale that of step s
        out["swa:start"] = next((s + 1 for s in range(n) if scales[s] < avg.start_scale and (s + 1) % avg.every == 0), None)
    if technique == "ema" and avg.shadow_swa_every:
        out["swa:start"] = next((s + 1 for s in range(n) if scales[s] < avg.shadow_swa_start_scale and (s + 1) % avg.shadow_swa_every == 0), None)
    for mod in stack.modifiers:
        if mod.technique == "late_qat":
            out["late_qat:enabled"] = next((s for s in range(n) if scales[s] < mod.params.threshold), None)
        if mod.technique == "depth_recurrence":
            out["depth_recurrence:enabled"] = mod.params.start_step if mod.params.start_step < n else None
    return out


@pytest.mark.parametrize("name", BUNDLED)
def test_every_switch_of_a_bundled_stack_fires_in_its_toy(registry, name):
    full = load_stack(STACKS / f"{name}.toml", registry)
    toy, _ = load_toy_stack(STACKS / f"{name}.toml", registry)
    fires = _fires(toy, registry)
    assert all(step is not None for step in fires.values()), fires
    # ... and at about the same fraction of the run as in the full recipe (by steps; the records stop at a wallclock cap)
    full_fires = _fires(attrs.evolve(full, run=attrs.evolve(full.run, max_wallclock_seconds=0.0)), registry)
    for key, step in fires.items():
        if full_fires.get(key) is not None:
            assert abs(step / toy.run.iterations - full_fires[key] / full.run.iterations) < 0.08, (key, step, full_fires[key])


def test_set_changes_the_toy_and_config_shows_it(capsys):
    from pgolf_core.cli import main

    assert main(["config", "pr1392", "--toy", "--set", "run.iterations=12", "--set", "modifier.depth_recurrence.start_step=3"]) == 0
    out = capsys.readouterr().out
    assert "# --toy model.model_dim=64" in out and "# --set run.iterations=12" in out
    assert "iterations = 12" in out and "start_step = 3" in out and 'path = "sample:sp4096"' in out
    assert 'name = "pr1392-toy-variant"' in out and 'author = ""' in out and "reported_val_bpb" not in out


def test_a_vocabulary_without_a_sample_keeps_its_data_and_says_so(registry, tmp_path):
    path = tmp_path / "v2048.toml"
    path.write_text(f'schema_version = 1\nextends = "{STACKS / "baseline.toml"}"\n[model]\nvocab_size = 2048\n')
    settings, notes = toy_settings(load_stack(path, registry))
    assert not any(s.startswith("data.path") for s in settings)
    assert notes == ["no built-in sample for model.vocab_size=2048 (there are sp1024, sp4096, sp8192); the toy keeps data.path and data.tokenizer"]


def test_pr1392_toy_runs_offline_and_logs_every_switch(tmp_path):
    """The acceptance run: no data but what pgolf ships, every switch of the recipe in the log, no published name or score."""
    proc = run_cli(["run", "pr1392", "--toy", "--run-id", "toy"], tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "toy"
    log = (run / "log.txt").read_text()
    for line in ("depth_recurrence:enabled step:6 layers:4,5", "late_qat:enabled step:39", "swa:start step:40", "ema:applying EMA weights",
                 "gptq:collected hessians for", "selective_prune:", "final_int6_sliding_window_exact", "threads:"):
        assert line in log, line
    assert "sample_sp4096" in log and "tokenizer_path=" in log and "fineweb_4096_bpe.model" in log
    sub = json.loads((run / "submission.json").read_text())
    assert (sub["author"], sub["github_id"], sub["name"]) == ("", "", "pr1392-toy")
    report = (run / "report.md").read_text()
    assert report.startswith("# pr1392-toy: run toy") and "reported val_bpb" not in report and "| status | complete |" in report
    assert "| variant of the stack | toy (`--toy`," in report
