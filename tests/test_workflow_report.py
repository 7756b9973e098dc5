"""Reading runs back: report.md and loss.png, ``pgolf compare`` and ``pgolf significance``."""

from __future__ import annotations

import json
import sys

import pytest

from pgolf_core.cli import main
from pgolf_core.errors import DataError
from pgolf_core.report import parse_switches, read_run, write_report

LOG = """\
step:0/40 val_loss:6.9000 val_bpb:3.7000 train_time:0ms step_avg:0.00ms
val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=x.model
swa:start step:20
late_qat:enabled step:30 scale:0.1499
ema:applying EMA weights
final_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}
"""


def make_run(root, run_id, seed, final_loss, steps=40, stack="stacks/sample.toml"):
    """A run directory as pgolf leaves it, with made-up numbers."""
    run = root / run_id
    run.mkdir(parents=True)
    bpb = final_loss / 1.85
    records = [{"kind": "train", "step": s, "train_loss": 7.0 - s * 0.02 - seed * 1e-3, "train_time_ms": 50.0 * s, "lr_scale": 1.0 - s / steps}
               for s in range(1, steps + 1)]
    records += [{"kind": "val", "step": s, "val_loss": 6.9 - s * 0.02, "val_bpb": (6.9 - s * 0.02) / 1.85, "train_time_ms": 50.0 * s}
                for s in (0, 20, steps)]
    records.append({"kind": "final", "name": "final_int8_zlib_roundtrip", "val_loss": final_loss, "val_bpb": bpb, "eval_time_ms": 12.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"run_id": run_id, "stack": stack, "seed": seed, "steps": steps, "train_time_ms": 50.0 * steps, "model_params": 181392,
               "bytes_code": 200000, "bytes_model": 300000, "bytes_total": 500000,
               "final": {"final_int8_zlib_roundtrip": {"val_loss": final_loss, "val_bpb": bpb}}, "compliant": True}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "submission.json").write_text(json.dumps({"val_loss": round(final_loss, 8), "val_bpb": round(bpb, 8)}))
    (run / "stack.toml").write_text(
        '# resolved\nschema_version = 1\n[meta]\nname = "sample"\ndescription = "toy run"\n[run]\niterations = 80\nartifact_cap_bytes = 16000000\n'
        '[mlp]\nuse = "relu2"\n[optimizer]\nuse = "muon"\n[[modifier]]\nuse = "xsa"\nlayers = "last 2"\n'
    )
    (run / "log.txt").write_text(LOG.format(loss=final_loss, bpb=bpb))
    return run


def test_switches_are_read_from_the_reference_log_formats():
    found = [(s.name, s.step) for s in parse_switches(LOG.format(loss=1.0, bpb=1.0))]
    assert found == [("swa:start", 20), ("late_qat:enabled", 30), ("ema:applying", None)]


def test_report_tells_the_story_of_the_run(tmp_path):
    run = make_run(tmp_path, "r1", 1337, 2.10000000)
    md, png = write_report(run)
    text = md.read_text()
    assert text.startswith("# sample: run r1\n\ntoy run\n")
    assert "| final val_loss | 2.10000000 nats |" in text
    assert "| steps | 40 of 80 (stopped at the wallclock cap) |" in text
    assert "| artifact | 500,000 bytes (code 200,000 + model 300,000) of the 16,000,000-byte cap |" in text
    assert "| mlp | relu2 |" in text and "| modifier[0] | xsa (layers 'last 2') |" in text
    assert "- step 20: `swa:start step:20`" in text and "- after training: `ema:applying EMA weights`" in text
    assert "val_bpb:enabled" not in text  # a status line, not a switch
    assert "| 20 | 1.0 | 6.5000 | 3.5135 |" in text
    assert "![train and validation loss, LR multiplier](loss.png)" in text
    assert png == run / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_says_which_final_lines_the_rules_allow(tmp_path):
    run = make_run(tmp_path, "r1", 1337, 2.1)
    summary = json.loads((run / "summary.json").read_text())
    summary["final"] = {
        "final_int6_sliding_window": {"val_loss": 2.1, "val_bpb": 1.1, "compliant": True, "compliance": "causal scoring"},
        "final_slot": {"val_loss": 1.3, "val_bpb": 0.7, "compliant": False, "compliance": "optimises on the tokens it scores"},
    }
    summary["quantizer_compliance"] = [{"what": "gptq calibration data", "ok": True, "reason": "self-generated"}]
    summary["score_line"] = "final_int6_sliding_window"
    (run / "summary.json").write_text(json.dumps(summary))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' not in line]
    records += [{"kind": "final", "name": n, "val_loss": v["val_loss"], "val_bpb": v["val_bpb"], "eval_time_ms": 5.0} for n, v in summary["final"].items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(run)[0].read_text()
    assert "| final_slot | 1.30000000 | 0.70000000 | 5 | **no** |" in text
    assert "| final_int6_sliding_window | 2.10000000 | 1.10000000 | 5 | yes |" in text
    assert "- `final_slot`: **not allowed** — optimises on the tokens it scores" in text
    assert "- `gptq calibration data`: allowed — self-generated" in text
    assert "- submission.json carries `final_int6_sliding_window`." in text


def test_without_matplotlib_the_report_says_so_and_skips_the_png(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, "r1", 1337, 2.1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", str(run)]) == 0
    assert "loss.png skipped: matplotlib is not installed (pip install 'pgolf[plot]')" in capsys.readouterr().out
    assert not (run / "loss.png").exists()
    assert "loss.png was not drawn: matplotlib is not installed (pip install 'pgolf[plot]')." in (run / "report.md").read_text()


def test_not_a_run_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DataError, match="not a pgolf run directory"):
        read_run(tmp_path)
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "nope: not a directory; pass a run directory such as runs/<run_id>" in capsys.readouterr().err


def test_compare_prints_a_table_and_one_overlaid_plot(tmp_path, capsys):
    runs = [make_run(tmp_path, f"r{i}", 1337 + i, 2.1 - 0.01 * i) for i in range(3)]
    plot = tmp_path / "cmp.png"
    assert main(["compare", *map(str, runs), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | stack | status | seed | steps |") and out[0].endswith("| within the rules | variant |")
    assert out[2] == "| r0 | stacks/sample.toml | complete | 1337 | 40 | 2.0 | 181,392 | 500,000 | 2.10000 | 1.13514 | yes | - |"
    assert [line.split(" | ")[0] for line in out[2:]] == ["| r0", "| r1", "| r2"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def _sig(tmp_path, capsys, candidate, baseline, *extra):
    cands = [make_run(tmp_path / "c", f"c{i}", 1337 + i, v) for i, v in enumerate(candidate)]
    bases = [make_run(tmp_path / "b", f"b{i}", 1337 + i, v) for i, v in enumerate(baseline)]
    code = main(["significance", *map(str, cands), "--baseline", *map(str, bases), *extra])
    return code, capsys.readouterr()


def test_significance_accepts_a_clear_record(tmp_path, capsys):
    code, out = _sig(tmp_path, capsys, [1.200, 1.201, 1.199], [1.210, 1.212, 1.209])
    assert code == 0
    assert "candidate c0  seed 1337  val_loss 1.20000000" in out.out
    assert "improvement: 0.010333 nats (required > 0.005 nats)" in out.out
    assert "welch one-sided: t=5.0596 df=3.45 p=0.00527755 (alpha 0.01)" in out.out
    assert "SIGNIFICANT: the candidate beats the baseline by more than 0.005 nats at p < 0.01" in out.out


def test_significance_rejects_a_noisy_gain(tmp_path, capsys):
    code, out = _sig(tmp_path, capsys, [1.18, 1.21, 1.19], [1.20, 1.22, 1.21])
    assert code == 1 and "NOT SIGNIFICANT" in out.out


def test_significance_needs_several_seeds(tmp_path, capsys):
    code, out = _sig(tmp_path, capsys, [1.18], [1.20, 1.22])
    assert code == 2 and "error: significance: need at least 2 runs on each side" in out.err and "add runs with other seeds" in out.err


def test_significance_refuses_a_run_or_a_seed_counted_twice(tmp_path, capsys):
    """Counting a run twice (or in both groups), or two runs of one seed in a group, fakes independent samples."""
    cands = [make_run(tmp_path / "c", f"c{i}", 1337 + i, v) for i, v in enumerate([1.200, 1.201, 1.199])]
    bases = [make_run(tmp_path / "b", f"b{i}", 1337 + i, v) for i, v in enumerate([1.210, 1.212, 1.209])]
    copy = make_run(tmp_path / "copy", "c0", 1400, 1.2)  # another directory holding run c0
    same_seed = make_run(tmp_path / "s", "s0", 1337, 1.198)
    cases = [
        ([cands[0], cands[0], cands[1]], bases, f"{cands[0]}: the same run as {cands[0]} (same directory)"),
        ([*cands, copy], bases, f"{copy}: the same run as {cands[0]} (same run id 'c0')"),
        (cands, [*bases[:2], cands[2]], f"{cands[2]}: the same run as {cands[2]} (same directory)"),
        ([*cands, same_seed], bases, f"{same_seed}: seed 1337 is counted twice among the candidate runs (also {cands[0]})"),
    ]
    for candidate, baseline, words in cases:
        code = main(["significance", *map(str, candidate), "--baseline", *map(str, baseline)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {words}"), err
