"""A run killed mid-way and resumed is the same run: every logged number equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FIXTURE_1024, FIXTURE_4096, STACKS, TOKENIZER_1024, TOKENIZER_4096, run_cli
from pgolf_core.logparse import parse_log

TINY = [
    "model.num_layers=4", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
    "data.train_seq_len=64", "data.train_batch_tokens=4096", "data.val_batch_size=8192",
    f'data.path="{FIXTURE_1024}"', f'data.tokenizer="{TOKENIZER_1024}"',
    "run.iterations=8", "run.warmup_steps=0", "run.max_wallclock_seconds=0.0", "run.val_loss_every=4", "run.train_log_every=1",
    "schedule.warmdown_iters=4",
]
RECORD_TINY = [  # pr400 at tiny size: SWA snapshots and late QAT both switch on before the end
    "modifier[0].vocab_size=64", "modifier[0].dim=16", "modifier[2].rope_dims=8", "modifier[3].layers='last 2'",
    "modifier[5].layers='last 2'", 'modifier[6].mode="working"', "modifier[6].threshold=0.5",
    "averaging.every=1", "averaging.start_scale=0.8", "averaging.max_checkpoints=3",
    "evaluator.eval_seq_len=64", "evaluator.stride=32", "schedule.warmdown_iters=6",
]

RECURRENT_TINY = [  # pr1392 at tiny size on the sp4096 fixture: the kill (after step 5) falls after the last
    # checkpoint (step 4) and before nothing else, so the resumed run switches recurrence on itself at step 5,
    # with the Parallel Muon banks' bf16 momentum and the recurrence scales' accumulated gradient restored.
    f'data.path="{FIXTURE_4096}"', f'data.tokenizer="{TOKENIZER_4096}"',
    "modifier[1].rope_dims=8", "modifier[4].layers=[2, 3]", "modifier[5].layers=[1]", "modifier[5].start_step=5",
    'modifier[6].layers="2:"', "quantizer.calib_seqs=4", "evaluator.eval_seq_len=64", "evaluator.stride=32",
]


def _args(stack: str) -> list[str]:
    sets = TINY + {"pr400": RECORD_TINY, "pr1392": RECURRENT_TINY}.get(stack, [])
    out = ["run", str(STACKS / f"{stack}.toml")]
    for s in sets:
        out += ["--set", s]
    return out


def _env(tmp_path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")} | {
        "PGOLF_CACHE": str(tmp_path / ".cache"),
        "OMP_NUM_THREADS": "1",
    }


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own, out of reach of killpg)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _start_and_stop(args, tmp_path, run_id: str, after_step: int, sig: int) -> int:
    log = tmp_path / "runs" / f"{run_id}.partial" / "log.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgolf", *args, "--run-id", run_id, "--checkpoint-every", "2"],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and f"step:{after_step}/8 train_loss" in log.read_text():
            targets = [proc.pid] if sig != signal.SIGKILL else [*_descendants(proc.pid), proc.pid]
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.05)
    proc.wait(timeout=120)
    return proc.returncode


def _numbers(run_dir):
    got = parse_log((run_dir / "log.txt").read_text())
    return got["train_loss"], got["val"], got["finals"]


@pytest.mark.parametrize(
    "stack, nproc, sig",
    # SIGTERM on one process (the step finishes, a checkpoint is written, exit 130) and SIGKILL of a torchrun
    # worker mid-run (the last periodic checkpoint is what is left); the baseline's plainer runs add no path.
    [("pr400", 1, signal.SIGTERM), ("pr1392", 2, signal.SIGKILL)],
    ids=["pr400-1proc-term", "pr1392-2proc-kill"],
)
def test_interrupted_run_resumes_to_identical_numbers(stack, nproc, sig, tmp_path):
    args = _args(stack) + ["--nproc-per-node", str(nproc)]
    straight = run_cli(args + ["--run-id", "straight"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert straight.returncode == 0, straight.stderr[-2000:]

    code = _start_and_stop(args, tmp_path, "cut", after_step=5, sig=sig)
    if sig == signal.SIGTERM:
        assert code == 130  # finished the step, checkpointed, said so
        assert (tmp_path / "runs" / "cut.failed" / "checkpoints").is_dir()
        target = tmp_path / "runs" / "cut.failed"
    else:
        assert code != 0
        target = tmp_path / "runs" / "cut.partial"
        assert (target / "checkpoints").is_dir()
    resumed = run_cli(args + ["--resume", str(target)], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, [line for line in resumed.stderr.splitlines() if "error" in line][:5]
    log = (tmp_path / "runs" / "cut" / "log.txt").read_text()
    assert "resumed at step:" in log
    if stack == "pr1392":
        assert "depth_recurrence:enabled step:5 layers:1" in log.split("resumed at step:")[1]
    assert _numbers(tmp_path / "runs" / "cut") == _numbers(tmp_path / "runs" / "straight")


def test_torn_checkpoint_is_skipped_and_a_damaged_one_refused(tmp_path, registry):
    """Torn (no marker: the save died) → the previous complete one is used; damaged (a committed file changed)
    → refused with one line, never a silent fall back to older weights."""
    from pgolf_core import checkpoint
    from pgolf_core.errors import DataError
    from pgolf_core.runtime import Runtime
    import torch

    rt = Runtime(0, 1, 0, False, torch.device("cpu"), False, False, 8)
    run = tmp_path / "r.partial"
    checkpoint.save(run, 2, {"x": torch.ones(2)}, rt)
    (run / "checkpoints" / "step_00000004").mkdir()  # a newer save that died before its marker
    (run / "checkpoints" / "step_00000004" / "rank0.pt").write_bytes(b"half")
    latest = checkpoint.latest(run)
    assert latest.name == "step_00000002" and torch.equal(checkpoint.load(latest, rt)["x"], torch.ones(2))
    (latest / "rank0.pt").write_bytes(b"corrupted")
    with pytest.raises(DataError, match="do not match the recorded sha256; the checkpoint is damaged, delete .*step_00000002"):
        checkpoint.load(latest, rt)


def test_resume_with_a_different_model_is_refused(tmp_path):
    args = _args("baseline")
    code = _start_and_stop(args, tmp_path, "cut", after_step=3, sig=signal.SIGKILL)
    assert code != 0
    target = str(tmp_path / "runs" / "cut.partial")
    changed = run_cli(args + ["--set", "model.num_layers=6", "--resume", target], tmp_path)
    assert changed.returncode == 2 and "model.num_layers: 4 -> 6" in changed.stderr and "Traceback" not in changed.stderr
    forced = run_cli(args + ["--set", "model.num_layers=6", "--resume", target, "--force"], tmp_path)
    assert forced.returncode == 2 and "cannot be overridden" in forced.stderr
    cadence = run_cli(args + ["--set", "run.val_loss_every=0", "--resume", target], tmp_path)
    assert cadence.returncode == 2 and "run.val_loss_every" in cadence.stderr
    ok = run_cli(args + ["--set", "run.val_loss_every=0", "--resume", target, "--force"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
