"""``pgolf rehearse``: every bundled stack through the whole pipeline on the CPU under the CUDA policy (bf16,
fullgraph compile), each compiled function at least two graphs below its recompile limit; the rehearsal counts
graphs from dynamo's own records, names a function over its limit and says how far over; calibration leaves
nothing on the model a compiled forward would guard on.

The stacks rehearse at a size below the toy's (2 layers of width 32, 10 steps of 4 sequences of 32 tokens, 385
validation tokens: a full validation batch and a partial one, the recipe's layer selectors moved onto the 2
layers in proportion), in this process, with the ``eager`` backend: the guards and recompiles are dynamo's
whatever the backend, and tracing the forward alone costs a third of ``aot_eager``. The artifact is accounted
with a fixed code size instead of packing each stack's script (seconds to minutes on a cold cache).
"""

from __future__ import annotations

import pytest

from conftest import STACKS
from pgolf_core.cli import main
from pgolf_core.config import load_stack
from pgolf_core.config.checks import parse_layers
from pgolf_core.rehearse import MARGIN, Rehearsal, rehearsal_stack, rehearse
from pgolf_core.toy import ToySize

BUNDLED = sorted(p.stem for p in STACKS.glob("*.toml"))
TINY = ToySize(iterations=10, warmup_steps=1, head_dim=16, max_heads=2, seq_len=32, batch_tokens=128, val_batch_tokens=256, grad_accum_base=1)
LAYERS = 2
VAL_TOKENS = 385  # 12 sequences of 32: validation batches of 8 and 4
CODE_BYTES = 60_000


def _depth_overrides(registry, name: str) -> list[str]:
    """``model.num_layers=2`` and each modifier's layers mapped onto them in proportion: PR #1392's recurrence on
    encoder layer 4 of 11 lands on encoder layer 0, its parallel blocks from layer 7 and value embeddings on
    [9, 10] on layer 1. Sampled GPTQ calibration gets 16 sequences (the toy rule leaves 1 of 32 tokens, too few
    for the Hessian of a 128-wide input)."""
    full = load_stack(STACKS / f"{name}.toml", registry)
    n = full.model.num_layers
    out = [f"model.num_layers={LAYERS}"]
    for i, mod in enumerate(full.modifiers):
        if mod.layers != "all":
            out.append(f"modifier[{i}].layers={sorted({layer * LAYERS // n for layer in parse_layers(mod.layers, n)})}")
        elif hasattr(mod.params, "loop_start"):  # segment_recurrence's range given by its own indices (#1394)
            out += [f"modifier[{i}].loop_start={mod.params.loop_start * LAYERS // n}", f"modifier[{i}].loop_end={mod.params.loop_end * LAYERS // n}"]
    if hasattr(full.params("quantizer"), "calib_seqs"):
        out.append("quantizer.calib_seqs=16")
    return out


def tiny_rehearsal(registry, name: str, *extra: str) -> tuple[Rehearsal, object]:
    stack = rehearsal_stack(str(STACKS / f"{name}.toml"), registry, [*_depth_overrides(registry, name), *extra], size=TINY)
    return rehearse(stack, registry, backend="eager", val_tokens=VAL_TOKENS, bytes_code=CODE_BYTES), stack


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_stack_rehearses_with_a_margin_of_two_graphs(registry, name):
    r, stack = tiny_rehearsal(registry, name)
    assert r.error is None and r.problems() == [], r.problems()
    assert r.phases == ["warm-up", "validation", "training", "averaging and pre-quantization evaluation", *(
        ["calibration"] if "calibration" in r.phases else []), "quantize, compress and round trip", "final evaluation"]
    forward = r.function("GPT.forward")
    assert forward.limit == stack.run.recompile_limit and forward.fullgraph
    # The warm-up, a validation (no grad), its partial last batch, then training again: at least four graphs.
    assert 4 <= len(forward.graphs) <= forward.limit - MARGIN
    for f in r.functions:
        assert f.margin >= MARGIN and not f.failures and (f.graph_breaks == 0 or not f.fullgraph), f
    if name in ("pr1019", "pr1392"):  # GPTQ calibrates on the live model: nothing it leaves may cost a graph
        late = [g for g in forward.graphs if g.phase in ("calibration", "quantize, compress and round trip", "final evaluation")]
        assert late == [], [g.reason() for g in late]
    if name == "pr1392":  # recurrence switched on: a new training graph that failed only on the switch
        on = [g for g in forward.graphs if g.phase.startswith("train step") and "schedule.active == False" in g.reason()]
        assert len(on) == 1 and "parallel_muon" not in " ".join(f.where for f in r.functions)  # Newton-Schulz eager, as #1019/#1392


def test_a_function_over_or_near_its_limit_fails_naming_it_and_by_how_much(registry, tmp_path, capsys):
    # The baseline's forward builds 4 graphs at this size (warm-up, validation, its partial batch, training).
    r, _ = tiny_rehearsal(registry, "sample", "run.recompile_limit=3")
    forward = r.function("GPT.forward")
    assert len(forward.graphs) == 4 and forward.margin == -1
    (problem,) = [p for p in r.problems() if p.startswith("GPT.forward")]
    assert "builds 4 graphs, 1 over run.recompile_limit = 3" in problem and "FailOnRecompileLimitHit" in problem
    assert [g.phase for g in forward.graphs][:2] == ["warm-up", "validation at step 0"]
    assert forward.graphs[1].failed_guards == [(1, "GLOBAL_STATE changed: grad_mode")]


def test_the_command_reports_each_function_and_fails_in_one_line_near_the_limit(monkeypatch, capsys):
    import pgolf_core.rehearse as rehearse_module

    monkeypatch.setattr(rehearse_module, "REHEARSAL_SIZE", TINY)  # the command's own size is the toy's: slower
    argv = ["rehearse", "sample", "--backend", "eager", "--val-tokens", str(VAL_TOKENS), "--set", "run.recompile_limit=5"]
    assert main(argv) == 6
    out, err = capsys.readouterr()
    rows = {ln.split()[0]: [int(x) for x in ln.split()[1:4]] for ln in out.splitlines() if ln.startswith(("GPT.", "zeropower"))}
    assert rows["GPT.forward"] == [4, 5, 1]
    graphs, limit, margin = rows["zeropower_via_newtonschulz5"]  # the baseline's Muon compiles Newton-Schulz: one graph per shape
    assert limit == 5 and margin == 5 - graphs
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors[0].startswith("error: GPT.forward (pgolf_core/model/gpt.py:") and "builds 4 graphs against run.recompile_limit = 5: 1 past the margin of 2" in errors[0]
    assert len(errors) == 1 + (margin < MARGIN) and "Traceback" not in err
    assert "bf16 autocast, torch.compile backend eager" in out and "2. validation at step 0" in out
