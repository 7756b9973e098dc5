"""The researcher's loop: modifiers by name, honest metadata on variants, seed sweeps into significance, thread
choice, and the small frictions (did-you-mean, selectors, compare and report on failed runs)."""

from __future__ import annotations

import json

import pytest

from conftest import STACKS, run_cli
from pgolf_core.cli import main
from pgolf_core.config import load_stack
from pgolf_core.config.diff import diff_stacks
from pgolf_core.errors import ConfigError

BUNDLED = sorted(p.stem for p in STACKS.glob("*.toml"))


def _problems(registry, *overrides, path=STACKS / "pr400.toml", **kw):
    with pytest.raises(ConfigError) as info:
        load_stack(path, registry, overrides=list(overrides), **kw)
    return info.value.problems


# -- modifiers by name -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_every_modifier_of_every_bundled_stack_is_settable_by_name(registry, name):
    stack = load_stack(STACKS / f"{name}.toml", registry)
    for i, mod in enumerate(stack.modifiers):
        changed = load_stack(STACKS / f"{name}.toml", registry, overrides=[f'modifier.{mod.technique}.layers="last 1"'])
        assert changed.modifiers[i].layers == "last 1"
        assert [m.layers for j, m in enumerate(changed.modifiers) if j != i] == [m.layers for j, m in enumerate(stack.modifiers) if j != i]


def test_the_names_diff_prints_are_accepted_back(registry):
    old, new = load_stack(STACKS / "pr315.toml", registry), load_stack(STACKS / "pr400.toml", registry)
    keys = [k for k, _, b in diff_stacks(old, new) if k.startswith("modifier.") and b is not None]
    assert "modifier.canon.kernel" in keys and "modifier.canon.layers" in keys
    stack = load_stack(STACKS / "pr400.toml", registry, overrides=["modifier.canon.kernel=5", 'modifier.canon.layers="last 3"'])
    canon = next(m for m in stack.modifiers if m.technique == "canon")
    assert (canon.params.kernel, canon.layers) == (5, "last 3")
    legacy_form = load_stack(STACKS / "pr400.toml", registry, overrides=['modifier(xsa).layers="last 2"'])  # what --diff used to print
    assert next(m for m in legacy_form.modifiers if m.technique == "xsa").layers == "last 2"


def test_a_repeated_name_needs_its_use_number(registry, tmp_path):
    path = tmp_path / "two.toml"
    path.write_text(f'schema_version = 1\nextends = "{STACKS / "sample.toml"}"\n'
                    '[[modifier]]\nuse = "xsa"\nlayers = [0]\n[[modifier]]\nuse = "ln_scale"\n[[modifier]]\nuse = "xsa"\nlayers = [2]\n')
    stack = load_stack(path, registry, overrides=["modifier.xsa#2.layers=[3]"])
    assert [m.layers for m in stack.modifiers] == [[0], "all", [3]]
    (problem,) = _problems(registry, "modifier.xsa.layers=[1]", path=path)
    assert problem == "--set modifier.xsa.layers=[1]: the stack uses modifier 'xsa' 2 times; say which: modifier.xsa#1 or modifier.xsa#2"
    (problem,) = _problems(registry, "modifier.xsa#3.layers=[1]", path=path)
    assert "there is no #3" in problem
    other = load_stack(path, registry)
    assert [k for k, _, _ in diff_stacks(other, stack)] == ["meta.name", "modifier.xsa#2.layers"]


def test_an_unknown_modifier_name_gets_a_did_you_mean_and_the_stack_s_list(registry):
    (problem,) = _problems(registry, "modifier.xsaa.layers=2")
    assert problem.startswith("--set modifier.xsaa.layers=2: the stack has no modifier 'xsaa' (did you mean 'xsa'?); its modifiers: bigram_hash, smeargate,")


# -- honest metadata -------------------------------------------------------------------------------------------------
def test_a_stack_that_extends_another_does_not_inherit_its_identity(registry, tmp_path):
    sample = load_stack(STACKS / "sample.toml", registry)
    assert (sample.meta.name, sample.meta.author, sample.meta.github_id, sample.meta.reported_val_bpb, sample.meta.reported_bytes) == ("sample", "", "", None, None)
    child = tmp_path / "mine.toml"
    child.write_text(f'schema_version = 1\nextends = "{STACKS / "pr315.toml"}"\n[model]\nnum_layers = 12\n')
    meta = load_stack(child, registry).meta
    assert (meta.name, meta.author, meta.reported_val_bpb, meta.pr) == ("", "", None, 315)  # lineage (pr, source) stays


def test_overrides_make_a_variant_and_a_seed_does_not(registry):
    variant = load_stack(STACKS / "pr400.toml", registry, overrides=["optimizer.matrix_lr=0.03"]).meta
    assert (variant.name, variant.author, variant.github_id, variant.reported_val_bpb, variant.reported_bytes) == ("pr400-variant", "", "", None, None)
    seeded = load_stack(STACKS / "pr400.toml", registry, overrides=["run.seed=7", 'run.out_dir="elsewhere"']).meta
    assert (seeded.name, seeded.author, seeded.reported_val_bpb) == ("pr400", "chanwoo-park-official", 1.1296177)
    mine = load_stack(STACKS / "pr400.toml", registry, overrides=["optimizer.matrix_lr=0.03", 'meta.author="me"', 'meta.name="lr003"']).meta
    assert (mine.name, mine.author, mine.github_id) == ("lr003", "me", "")
    env = load_stack(STACKS / "pr400.toml", registry, legacy_env={"MATRIX_LR": "0.03", "SEED": "1"}).meta
    assert env.name == "pr400-variant" and env.reported_val_bpb is None


def test_legacy_last_n_beyond_the_depth_means_every_layer_as_in_the_reference(registry):
    stack = load_stack(STACKS / "pr1019.toml", registry, legacy_env={"NUM_LAYERS": "5", "XSA_LAST_N": "11", "VE_LAYERS": "3,4"})
    # Every layer, which the file's own selector already says: its spelling is kept.
    assert next(m for m in stack.modifiers if m.technique == "xsa").layers == "all"
    assert any(
        "XSA_LAST_N=11 -> modifier[3](xsa).layers = 'all' (11 > 5 layers: every layer, as the reference reads it; the same layers as the file's 'all')"
        in line for line in stack.legacy_env
    )
    narrower = load_stack(STACKS / "pr1019.toml", registry, legacy_env={"NUM_LAYERS": "5", "XSA_LAST_N": "3", "VE_LAYERS": "3,4"})
    assert next(m for m in narrower.modifiers if m.technique == "xsa").layers == "last 3"


# -- errors that name their cause --------------------------------------------------------------------------------------
def test_a_bad_table_name_in_set_blames_the_set_not_the_stack_file(registry):
    (problem,) = _problems(registry, "modle.num_layers=3")
    assert problem == "--set modle.num_layers=3: modle: unknown table or key 'modle' (did you mean 'model'?)"


@pytest.mark.parametrize("selector, reason", [('"last 0"', "selects no layer"), ('"4:2"', "selects no layer"), ('"last 20"', "the model has 11"), ("[]", "selects no layer")])
def test_selectors_that_pick_nothing_or_missing_layers_are_errors(registry, selector, reason):
    (problem,) = _problems(registry, f"modifier.xsa.layers={selector}")
    assert problem.startswith(f"--set modifier.xsa.layers={selector}: modifier[3](xsa).layers: ") and reason in problem


def test_did_you_mean_for_slots_and_stack_names(capsys):
    assert main(["list", "--slot", "mpl"]) == 2
    assert "error: --slot mpl: unknown slot (did you mean 'mlp'?)" in capsys.readouterr().err
    assert main(["validate", "pr401"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pr401: no stack file or bundled stack of that name (did you mean ") and "'pr400'" in err


def test_data_download_help_says_it_needs_the_network_and_how_much(capsys):
    with pytest.raises(SystemExit):
        main(["data", "download", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "needs the network" in text and "about 16 GB" in text and "pgolf run STACK --toy" in text


def test_missing_data_points_at_download_and_the_offline_sample(tmp_path, capsys):
    assert main(["run", "pr1392", "--set", f'data.tokenizer="{tmp_path / "t.model"}"', "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "pgolf data download --variant sp4096, needs the network" in err and "(--toy, or data.tokenizer = 'sample:sp4096')" in err
    assert not (tmp_path / "runs").exists()


def test_stacks_marks_a_reported_score_outside_the_rules(capsys):
    assert main(["stacks"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:3] for line in out[1:] if not line.startswith("note:")}
    assert out[0].split()[:5] == ["stack", "reported", "val_bpb", "within", "the"]
    assert rows["pr1319"] == ["0.6951071", "NO"] and rows["pr1392"] == ["1.10203473", "yes"] and rows["sample"] == ["-", "yes"]
    assert any(line.startswith("note: pr1319: final_slot: ") and line.endswith("within the rules: final_int6_roundtrip, final_int6_sliding_window")
               for line in out)


# -- threads ------------------------------------------------------------------------------------------------------------
def test_threads_take_the_free_cores_and_follow_an_override(monkeypatch):
    from pgolf_core import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 1.7)
    assert threads.choose(env={}) == (1, "2 cores, load 1.7, 1 process; --threads N to choose")  # a busy 2-core machine
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads, "load_average", lambda: 0.2)
    assert threads.choose(env={})[0] == 16 and threads.choose(processes=4, env={})[0] == 4
    monkeypatch.setattr(threads, "load_average", lambda: 40.0)
    assert threads.choose(env={})[0] == 1
    assert threads.choose(3, env={"OMP_NUM_THREADS": "8"}) == (3, "--threads")
    assert threads.choose(env={"OMP_NUM_THREADS": "8"}) == (8, "OMP_NUM_THREADS")
    assert threads.choose(env={"PGOLF_THREADS": "2", "OMP_NUM_THREADS": "8"}) == (2, "PGOLF_THREADS")
    with pytest.raises(ConfigError, match="--threads 0: must be >= 1"):
        threads.choose(0)


# -- progress bar -------------------------------------------------------------------------------------------------------
def test_the_bar_says_which_step_an_older_loss_is_from_and_ends_its_line_when_stopped():
    import io
    import types

    from pgolf_core.progress import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = ProgressBar(term, out=io.StringIO(), min_interval=0.0, width=120)
    stack = types.SimpleNamespace(data=types.SimpleNamespace(train_batch_tokens=4096), run=types.SimpleNamespace(max_wallclock_seconds=0.0))
    state = types.SimpleNamespace(step=10, iterations=30, train_time_ms=1000.0, train_loss=5.1, stack=stack, last_val=None)
    bar.pgolf_on_train_start(state)
    bar.console("step:10/30 train_loss:5.1000 train_time:1000ms step_avg:100.00ms")
    assert "loss 5.1000 ·" in bar.render(state)
    state.step = 13
    assert "loss 5.1000 (step 10) ·" in bar.render(state)  # logged every run.train_log_every steps
    bar.update(state, force=True)
    bar.close()
    assert term.getvalue().endswith("\n") and not bar.shown  # an interrupt message starts on its own line


# -- report, compare and ledger show overrides and status -------------------------------------------------------------
def test_report_and_compare_show_the_status_and_overrides_of_a_failed_variant(tmp_path, capsys, monkeypatch):
    from test_workflow_report import make_run

    ok = make_run(tmp_path, "ok", 1, 2.1)
    bad = make_run(tmp_path, "bad.failed", 2, 2.2)
    (bad / "summary.json").unlink()
    (bad / "submission.json").unlink()
    lines = [json.loads(line) for line in (bad / "metrics.jsonl").read_text().splitlines()]
    (bad / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if r["kind"] != "final" and r.get("step", 0) <= 20))
    (bad / "stack.toml").write_text("# resolved from stacks/sample.toml\n# --set optimizer.matrix_lr=9.0\n" + (bad / "stack.toml").read_text())
    with open(bad / "log.txt", "a") as f:
        f.write("run_failed: non-finite loss or gradients at step 21/40\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(ok), str(bad)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3] == "| bad.failed | sample | failed | - | 20 | 1.0 | - | - | 6.50000 | 3.51351 | - | --set optimizer.matrix_lr=9.0 |"
    assert out[-1] == "bad.failed: failed: non-finite loss or gradients at step 21/40; val_loss/val_bpb are its last validation"
    assert not (tmp_path / "compare.png").exists()  # no plot unless --plot FILE
    assert main(["report", str(bad)]) == 0
    assert "failed: non-finite loss" in capsys.readouterr().err
    text = (bad / "report.md").read_text()
    assert "| status | **failed**: non-finite loss or gradients at step 21/40 |" in text
    assert "| variant of the stack | `--set optimizer.matrix_lr=9.0` |" in text


def test_ledger_groups_show_the_variant(tmp_path):
    from pgolf_core.ledger import format_table

    recs = [{"recipe_sha256": "a" * 64, "stack": "stacks/pr400.toml", "seed": s, "status": "complete", "toy": True,
             "overrides": [f"run.seed={s}", "optimizer.matrix_lr=0.03"], "run_id": f"seed_{s}"} for s in (1, 2)]
    head = format_table(recs).splitlines()[0]
    assert head == f"recipe {'a' * 12}  stacks/pr400.toml  (--toy --set optimizer.matrix_lr=0.03)  seeds: 1, 2"


# -- sweeps -------------------------------------------------------------------------------------------------------------
def test_a_sweep_keeps_going_past_a_failed_seed_and_reports_the_spread(tmp_path, registry):
    import argparse

    from pgolf_core.sweep import MANIFEST, parse_seeds, run_sweep, spread
    from test_workflow_report import make_run

    stack = load_stack(STACKS / "sample.toml", registry)
    args = argparse.Namespace(stack="sample", set=[], plugin=[], legacy_env=False, toy=False, threads=None, debug=False, nproc_per_node="1")
    sweep_dir = tmp_path / "sw"
    commands = []

    def runner(cmd, env):
        commands.append(cmd)
        seed = int(cmd[cmd.index("--set") + 1].split("=")[1])
        if seed == 2:
            (sweep_dir / "seed_2.failed").mkdir()
            (sweep_dir / "seed_2.failed" / "metrics.jsonl").write_text("")
            (sweep_dir / "seed_2.failed" / "log.txt").write_text("run_failed: disk full\n")
            return 5
        make_run(sweep_dir, f"seed_{seed}", seed, {1: 2.0, 3: 2.2}[seed])
        assert env["PGOLF_LEDGER"] == str(tmp_path / "ledger.jsonl")
        return 0

    manifest, code = run_sweep(args, stack, parse_seeds("1,2,3"), sweep_dir, lambda line: None, runner=runner)
    assert code == 5 and [r["status"] for r in manifest["runs"]] == ["complete", "failed", "complete"]
    assert commands[0][3:7] == ["run", "sample", "--set", "run.seed=1"] and commands[0][-6:] == ["--out-dir", str(sweep_dir), "--run-id", "seed_1", "--nproc-per-node", "1"]
    assert manifest["val_loss"] == {"n": 2, "mean": pytest.approx(2.1), "std": pytest.approx(0.141421356), "min": 2.0, "max": 2.2}
    assert json.loads((sweep_dir / MANIFEST).read_text())["runs"][1]["error"] == "disk full"
    assert spread([1.0]).std == 0.0
    with pytest.raises(ConfigError, match="seed 1 is listed twice"):
        parse_seeds("1,2,1")


def test_sweep_then_significance_end_to_end(tmp_path):
    """pgolf sweep STACK --seeds 1,2,3,4 runs one directory per seed; pgolf significance takes a sweep (or its
    runs) directly, and refuses a run counted in both groups."""
    fast = ["--set", "run.iterations=2", "--set", "run.warmup_steps=0", "--set", "run.val_loss_every=0"]
    proc = run_cli(["sweep", "sample", "--seeds", "1,2,3,4", "--sweep-id", "base", *fast], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()  # the runs' own lines go to stderr: stdout is the summary
    assert out[0] == "sweep runs/base: sample-variant, 4 seed(s)" and [line.split()[1] for line in out[1:5]] == ["1", "2", "3", "4"]
    assert out[5].startswith("val_loss: mean ") and "(std, n=4; min " in out[5] and out[6].startswith("val_bpb: mean ")
    assert sorted(p.name for p in (tmp_path / "runs" / "base").iterdir()) == ["seed_1", "seed_2", "seed_3", "seed_4", "sweep.json"]
    manifest = json.loads((tmp_path / "runs" / "base" / "sweep.json").read_text())
    losses = [r["val_loss"] for r in manifest["runs"]]
    assert len(set(losses)) == 4 and manifest["val_loss"]["mean"] == pytest.approx(sum(losses) / 4)  # four seeds, four results
    ledger = [json.loads(line) for line in (tmp_path / "runs" / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in ledger) == [1, 2, 3, 4] and all(r["status"] == "complete" for r in ledger)
    same = run_cli(["significance", "runs/base", "--baseline", "runs/base"], tmp_path)
    assert same.returncode == 2 and "each run may be counted once, in one group" in same.stderr, same.stderr
    sig = run_cli(["significance", "runs/base/seed_1", "runs/base/seed_2", "--baseline", "runs/base/seed_3", "runs/base/seed_4"], tmp_path)
    assert sig.returncode == 1, sig.stderr  # a recipe does not beat itself
    assert "candidate: n=2" in sig.stdout and "baseline:  n=2" in sig.stdout and "NOT SIGNIFICANT" in sig.stdout


def test_a_sweep_refuses_to_set_the_seed_twice(capsys):
    assert main(["sweep", "sample", "--seeds", "1", "--set", "run.seed=5"]) == 2
    assert "error: --set run.seed=5: the sweep sets run.seed, run.run_id and run.out_dir for each seed; drop this --set" in capsys.readouterr().err
