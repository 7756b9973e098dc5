"""``pgolf export``: the records folder (its files, what they say), the script standing alone (no pgolf import,
packed and readable forms computing the same numbers), the code bytes every command reports, and the one-line
refusals of a bad destination or an unfinished run. Reproducing the references is ``test_export_parity.py``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, STACKS
from pgolf_core.cli import main
from pgolf_core.config import load_stack
from pgolf_core.export import bundle, code_bytes, packed_script
from pgolf_core.export import pack as pack_module
from pgolf_core.export.pack import unpack
from pgolf_core.logparse import parse_log

TINY = ["run.iterations=2", "run.warmup_steps=0", "run.val_loss_every=0", "run.train_log_every=1"]
GATED = REPO / "examples" / "pgolf-attention-gate" / "stacks" / "sample_gated.toml"


def _sets(*exprs: str) -> list[str]:
    return [a for e in exprs for a in ("--set", e)]


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _imports(source: str, *, required_only: bool = False) -> set[str]:
    """Top-level module names the source imports; ``required_only`` leaves out imports guarded by ``try``
    (an optional kernel such as FlashAttention-3 the script uses only where it is installed)."""
    tree = ast.parse(source)
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
    names = set()
    for node in ast.walk(tree):
        if required_only and id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-step run of the sample stack (on its built-in data)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "sample", "--out-dir", str(out), "--run-id", "done", *_sets(*TINY)]) == 0
    return out / "done"


def test_a_stack_exports_a_records_folder_whose_size_every_command_reports(tmp_path, capsys):
    dest = tmp_path / "records" / "pr400"
    assert main(["export", str(STACKS / "pr400.toml"), "-o", str(dest)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "requirements.txt", "submission.json", "train_gpt.py"]
    size = (dest / "train_gpt.py").stat().st_size
    assert f"code_bytes:{size} (packed train_gpt.py)" in out
    sub = json.loads((dest / "submission.json").read_text())
    assert sub["bytes_code"] == size and "val_bpb" not in sub  # a stack has no results yet
    readme = (dest / "README.md").read_text()
    for technique in ("canon", "tight_swa", "int6_percentile", "sliding_window"):
        assert technique in readme, technique
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    reqs = (dest / "requirements.txt").read_text().split()
    assert "torch" in reqs and not any(r.startswith("pgolf") for r in reqs)

    assert main(["validate", str(STACKS / "pr400.toml")]) == 0
    assert f"code_bytes:{size}\n" in capsys.readouterr().out


def test_the_script_stands_alone_and_both_forms_compute_the_same(tmp_path):
    """Packed (the counted form) and ``--no-pack`` (for review) run the same two steps to the same numbers, in a
    process where importing pgolf fails; the readable script has no pgolf import at all."""
    logs = {}
    for form in ("packed", "readable"):
        dest = tmp_path / form
        args = ["export", "sample", "-o", str(dest), *_sets(*TINY)] + (["--no-pack"] if form == "readable" else [])
        assert main(args) == 0
        script = dest / "train_gpt.py"
        if form == "readable":
            assert not _imports(script.read_text()) & {"pgolf", "pgolf_core", "plugins"}
        blocker = "import runpy, sys\nfor m in ('pgolf', 'pgolf_core'):\n    sys.modules[m] = None\nrunpy.run_path(sys.argv[1], run_name='__main__')\n"
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")} | {"OMP_NUM_THREADS": "1", "RUN_ID": "x"}
        proc = subprocess.run([sys.executable, "-c", blocker, str(script)], cwd=dest, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[form] = parse_log((dest / "logs" / "x.txt").read_text())
    assert sorted(logs["packed"]["train_loss"]) == [1, 2] and logs["packed"]["finals"]
    assert logs["packed"]["train_loss"] == logs["readable"]["train_loss"] and logs["packed"]["finals"] == logs["readable"]["finals"]


def test_a_finished_run_exports_with_its_results_and_log(finished, tmp_path, capsys):
    dest = tmp_path / "records"
    assert main(["export", str(finished), "-o", str(dest)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "requirements.txt", "submission.json", "train.log", "train_gpt.py"]
    assert (dest / "train.log").read_text() == (finished / "log.txt").read_text()
    sub, ran = json.loads((dest / "submission.json").read_text()), json.loads((finished / "submission.json").read_text())
    summary = json.loads((finished / "summary.json").read_text())
    assert sub["val_bpb"] == ran["val_bpb"] and sub["val_loss"] == ran["val_loss"]
    # the run counted the code the export writes, and validate of the same stack says so too
    assert sub["bytes_code"] == (dest / "train_gpt.py").stat().st_size == summary["bytes_code"]
    assert sub["bytes_total"] == summary["bytes_model"] + summary["bytes_code"]
    assert main(["validate", str(finished / "stack.toml")]) == 0
    assert f"code_bytes:{summary['bytes_code']}\n" in capsys.readouterr().out
    assert f"{ran['val_bpb']:.4f}"[:5] in (dest / "README.md").read_text()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d.write_text("x"), "is a file, not a folder; choose a folder path"),
        (lambda d: (d.mkdir(), (d / "keep.txt").write_text("x")), "exists and is not empty; choose another folder or pass --force"),
        (lambda d: None, "cannot write there"),
    ],
    ids=["a-file", "non-empty", "under-a-file"],
)
def test_a_bad_destination_is_one_line_and_writes_nothing(tmp_path, capsys, make, words):
    dest = tmp_path / "out"
    make(dest)
    target = tmp_path / "blocker" / "records" if words == "cannot write there" else dest
    if words == "cannot write there":
        (tmp_path / "blocker").write_text("a file where a folder should be")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args = ["export", "sample", "-o", str(target)] + (["--force"] if words.startswith("is a file") else [])
    assert main(args) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert words in line and str(target) in line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_force_replaces_a_non_empty_folder(tmp_path, capsys):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("x")
    assert main(["export", "sample", "-o", str(dest), "--force"]) == 0
    assert not (dest / "old.txt").exists() and (dest / "train_gpt.py").is_file()


def test_an_unfinished_run_is_refused(finished, tmp_path, capsys):
    for name in ("r.partial", "r.failed", "r.failed-ab12"):
        broken = tmp_path / name
        broken.mkdir()
        (broken / "stack.toml").write_text((finished / "stack.toml").read_text())
        assert main(["export", str(broken), "-o", str(tmp_path / "out")]) == 2
        (line,) = _errors(capsys.readouterr().err)
        assert "the run did not finish (no submission.json)" in line and f"--resume {broken}" in line
    assert not (tmp_path / "out").exists()


def test_a_third_party_technique_is_bundled_not_imported(tmp_path, capsys):
    pytest.importorskip("pgolf_attention_gate")
    dest = tmp_path / "gated"
    assert main(["export", str(GATED), "-o", str(dest), "--no-pack"]) == 0
    source = (dest / "train_gpt.py").read_text()
    assert "pgolf_attention_gate" not in _imports(source) and "sigmoid" in source
    assert "pgolf-attention-gate" not in (dest / "requirements.txt").read_text()
    assert "attention_output_gate" in (dest / "README.md").read_text()


# -- the bundler and the packer -----------------------------------------------------------------------------
def test_code_is_cached_by_techniques_and_values_are_spliced_as_data(registry, tmp_path, monkeypatch):
    """The second stack differs only in values: it reuses the minified code (the minifier is not called again)
    and its packed script carries its own values."""
    monkeypatch.setenv("PGOLF_EXPORT_CACHE", str(tmp_path / "cache"))
    first = load_stack(STACKS / "baseline.toml", registry)
    second = load_stack(STACKS / "baseline.toml", registry, overrides=["run.seed=7", "model.num_layers=5"])
    size = code_bytes(first, registry)
    calls = []
    real = pack_module.minify
    monkeypatch.setattr(pack_module, "minify", lambda s: calls.append(1) or real(s))
    monkeypatch.setattr("pgolf_core.export.minify", pack_module.minify)
    inside = unpack(packed_script(second, registry))
    assert calls == [] and code_bytes(first, registry) == size
    namespace: dict = {}
    exec("\n".join(line for line in inside.splitlines() if line.startswith(("STACK=", "ENV="))), namespace)
    assert namespace["STACK"] == bundle.stack_data(second) and namespace["STACK"]["model"]["num_layers"] == 5
    assert namespace["ENV"] == bundle.env_table(second)
    other = load_stack(STACKS / "pr400.toml", registry)
    packed_script(other, registry)
    assert calls == [1]  # other techniques: other code


def test_the_readable_script_keeps_only_what_the_stack_runs(registry):
    baseline = bundle.script_source(load_stack(STACKS / "baseline.toml", registry), registry)
    pr400 = bundle.script_source(load_stack(STACKS / "pr400.toml", registry), registry)
    ast.parse(baseline)
    assert "Canon" not in baseline and "Canon" in pr400  # a technique the stack does not use is not bundled
    assert _imports(baseline, required_only=True) <= {"__future__", "torch", "numpy", "sentencepiece", *sys.stdlib_module_names}
    assert _imports(baseline) - _imports(baseline, required_only=True) <= {"flash_attn_interface"}
    data_at = baseline.index("\nSTACK = ")
    assert baseline.index("\nENV = ") > data_at and baseline.rindex("\nif __name__ == '__main__':") > data_at
