"""The device check behind ``tools/gpu_check.sh``: what pgolf's CUDA path does on one GPU, in at most 8 minutes.

    tools/gpu_check.sh [--out DIR] [--doc FILE] [--baseline-ref SCRIPT] [--pr400-ref SCRIPT] [--data DIR --tokenizer FILE]
    tools/gpu_check.sh --cpu-dry-run [--out DIR] [--baseline-ref SCRIPT] [--pr400-ref SCRIPT]

Three checks, each a pgolf command run as a user would run it:

1. compiled runs: ``pgolf run STACK --toy`` of baseline, pr400 and pr1392 (the whole pipeline, every switch of the
   recipe within its 40 steps, ``torch.compile(fullgraph=True)`` on CUDA), side by side on the one GPU: graph
   breaks, recompile limits and the evaluators' compiled graphs fail here if anywhere;
2. throughput: ``pgolf bench STACK --steps 100 --reference SCRIPT`` for baseline and pr400, the reference
   ``train_gpt.py`` on the same shards and steps (step_avg of both and the ratio);
3. peak memory: the CUDA allocator's peak of every run and of both sides of each benchmark.

Each finished check becomes a row of the table between the ``gpu_check`` markers of ``docs/performance.md``
(device, torch, attention kernel, steps, step times, peak memory, outcome); a check that fails or runs out of
time gets a row saying so, and the tool exits 1. Everything it writes also lands in ``--out`` (``$OUT`` where
that is set): the updated ``performance.md``, ``gpu_check.json`` with every row and its details, the benchmarks'
JSON files and ``gpu_check.log``.

The time budget (480 s) is split between the phases; a phase gets what is left, so a slow compile cannot push
the whole check past its limit. Without the challenge's shards at ``data/datasets/fineweb10B_sp1024`` (a lent
machine reaches no network), the benchmarks read synthetic shards of the same size and format, which cost the
same per step; the row says which.

``--cpu-dry-run`` runs the same commands on CPU at tiny sizes (a few steps, the toy stacks; eager, as pgolf runs
on CPU), writes rows marked "CPU dry run" into a copy of the document in ``--out`` and never touches
``docs/performance.md``: the tool is tested this way, with the device parts (CUDA, the real reference scripts,
which refuse to start without CUDA) left out. A reference script given to the dry run must run on CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
HEADER = (
    "| check | stack | date | device | torch | attention | steps | pgolf step_avg ms | reference step_avg ms | "
    "pgolf / reference | peak MiB pgolf / reference | result |"
)
RUN_STACKS = ("baseline", "pr400", "pr1392")
BENCH_STACKS = ("baseline", "pr400")
BUDGET_S = 480.0
RUN_CHECK = "compiled run, toy size"
BENCH_CHECK = "bench --reference"
# Seconds each phase may take at most on the device; a phase also stops when the whole budget is spent. Expected
# on one H100/H200 (estimates, to be replaced by the first measurement): the three toy runs side by side 60-100 s
# (compiles), a baseline pair 2 x (startup 10 s + compile 40-60 s + 100 x ~0.3 s), a pr400 pair 2 x (10 s + 60-80 s
# + 100 x ~0.75 s, the record's 95 ms x 8 accumulated micro-batches): the budget is tight for pr400, whose row
# then says it ran out of time rather than the check running past its limit.
PHASE_S = {"runs": 120.0, "bench:baseline": 150.0, "bench:pr400": 210.0}
BENCH_STEPS, BENCH_WARMUP = 100, 5
VAL_TOKENS = 1_048_576  # the benchmarks' validation slice: the reference validates once after its last step
# The dry run keeps each command to seconds on CPU: two steps, and the sliding window and the self-generated
# calibration of the toy stacks cut down (both run, on less).
DRY_RUN_SETS = ["run.iterations=2", "run.warmup_steps=0", "run.val_loss_every=0"]
DRY_STACK_SETS = {"pr400": ["evaluator.stride=64"], "pr1392": ["evaluator.stride=64", "quantizer.calib_seqs=1"]}
DRY_BENCH_STEPS, DRY_BENCH_WARMUP = 2, 1


class CheckError(Exception):
    """A problem with the check's own inputs: one line, exit 2."""


# -- the document -----------------------------------------------------------------------------------------------
def update_doc(text: str, rows: list[list[str]]) -> str:
    """Replace the rows of the same (check, stack) between the markers, append new ones; other rows stay."""
    if BEGIN not in text or END not in text:
        raise CheckError(f"the document has no '{BEGIN}' ... '{END}' table to write the rows into")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    lines = [line for line in table.strip("\n").splitlines() if line.strip()]
    body = lines[2:] if len(lines) >= 2 else []
    new = {(r[0], r[1]): r for r in rows}
    out, seen = [], set()
    for line in body:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = (cells[0], cells[1]) if len(cells) > 1 else None
        if key in new:
            out.append(_row(new[key]))
            seen.add(key)
        else:
            out.append(line)
    out += [_row(r) for key, r in new.items() if key not in seen]
    separator = "|" + "---|" * HEADER.count(" | ") + "---|"
    return head + BEGIN + "\n" + "\n".join([HEADER, separator, *out]) + "\n" + END + tail


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"


# -- running commands ---------------------------------------------------------------------------------------------
class Job:
    """A command in its own process group, its output to a file; ``finish`` waits up to a deadline, then stops
    the whole group (pgolf and what it started), and reports the peak resident memory of the process."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.argv, self.log = argv, log
        self.started = time.monotonic()
        self.fh = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.returncode: int | None = None
        self.timed_out = False
        self.max_rss_mib: float | None = None

    def finish(self, deadline: float) -> None:
        if self.returncode is not None:
            return
        kill_at = None
        while self.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.max_rss_mib = usage.ru_maxrss / 1024.0  # KiB on Linux
                break
            now = time.monotonic()
            if kill_at is None and now >= deadline:
                self.timed_out = True  # SIGTERM first: pgolf finishes its phase and stops what it started
                self._signal(signal.SIGTERM)
                kill_at = now + 20.0
            elif kill_at is not None and now >= kill_at:
                self._signal(signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(0.2)
        self.wall_s = time.monotonic() - self.started
        self.fh.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def failure(self) -> str:
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        return f"FAILED (exit {self.returncode}): {(errors or lines or ['no output'])[-1][:200]}"


# -- the check ---------------------------------------------------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.cpu_dry_run
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="pgolf-gpu-check-"))
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("", encoding="utf-8")
        self.start = time.monotonic()
        self.budget = args.budget_s
        self.rows: list[list[str]] = []
        self.details: list[dict] = []
        self.failed = False
        self.env = {**os.environ, "PGOLF_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
        if self.dry:
            self.env.setdefault("OMP_NUM_THREADS", "1")
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on CPU also on a GPU machine

    # bookkeeping
    def say(self, line: str) -> None:
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def deadline(self, phase: str) -> float:
        share = self.budget if self.dry else PHASE_S[phase] * self.budget / BUDGET_S
        return time.monotonic() + max(0.0, min(share, self.left()))

    def pgolf(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pgolf", *args]

    def job(self, name: str, argv: list[str]) -> Job:
        self.say("$ " + " ".join(shlex.quote(a) for a in argv))
        return Job(argv, self.work / f"{name}.log", self.env, self.work)

    def keep_log(self, name: str, job: Job) -> None:
        text = job.output().splitlines()
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {name}: exit {job.returncode}, {job.wall_s:.1f} s, last lines ---\n")
            fh.write("\n".join(text[-25:]) + "\n")

    # facts about the machine
    def environment(self) -> None:
        probe = (
            "import json, torch\n"
            "import pgolf_core.cli\n"
            "try:\n import flash_attn_interface; fa3 = True\nexcept Exception:\n fa3 = False\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps({'torch': torch.__version__, 'cuda': cuda, 'device': torch.cuda.get_device_name(0) if cuda else 'cpu', 'fa3': fa3}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckError(f"{sys.executable} cannot import torch and pgolf ({last}); install pgolf first (docs/performance.md, 'Device check')")
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
        if not self.dry and not facts["cuda"]:
            raise CheckError("no CUDA device here; run it on the GPU machine, or rehearse it with --cpu-dry-run")
        self.torch = facts["torch"]
        self.device = "CPU dry run" if self.dry else facts["device"]
        self.attention = "SDPA" if self.dry or not facts["fa3"] else "FlashAttention-3"
        self.date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        if self.dry:
            self.date += " (CPU dry run)"
        self.say(f"gpu_check: {self.device}, torch {self.torch}, attention {self.attention}, budget {self.budget:.0f} s")

    # 1. compiled runs
    def runs(self) -> None:
        jobs = {}
        for stack in RUN_STACKS:
            argv = self.pgolf("run", stack, "--toy", "--run-id", f"gpu-check-{stack}", "--out-dir", str(self.work / "runs"))
            if self.dry:
                for expr in DRY_RUN_SETS + DRY_STACK_SETS.get(stack, []):
                    argv += ["--set", expr]
            jobs[stack] = self.job(f"run-{stack}", argv)
            if self.dry:  # one at a time on CPU; side by side on the GPU
                jobs[stack].finish(self.deadline("runs"))
        deadline = self.deadline("runs")
        for stack, job in jobs.items():
            job.finish(deadline)
            self.keep_log(f"run {stack}", job)
            self.rows.append(self.run_row(stack, job))

    def run_row(self, stack: str, job: Job) -> list[str]:
        from pgolf_core.logparse import parse_log

        text = job.output()
        got = parse_log(text)
        steps = max(got["train_loss"], default=0)
        step_avg = got["step_avg_ms"].get(steps)
        peak = re.search(r"peak memory allocated: (\d+) MiB", text)
        peak_cell = f"{peak.group(1)}" if peak else (f"{job.max_rss_mib:.0f} (max RSS)" if job.max_rss_mib else "n/a")
        if job.returncode == 0 and not job.timed_out:
            final = next(reversed(got["finals"].items()), None)
            result = f"ok, {final[0].removesuffix('_exact')} val_bpb {final[1][1]:.4f}, {job.wall_s:.0f} s" if final else f"ok, {job.wall_s:.0f} s"
        else:
            self.failed = True
            result = job.failure()
        self.details.append({"check": RUN_CHECK, "stack": stack, "command": job.argv, "exit": job.returncode, "timed_out": job.timed_out,
                             "wall_s": job.wall_s, "steps": steps, "step_avg_ms": step_avg, "log_peak_mib": int(peak.group(1)) if peak else None,
                             "max_rss_mib": job.max_rss_mib, "finals": got["finals"], "result": result})
        return [RUN_CHECK, stack, self.date, self.device, self.torch, self.attention, str(steps or "–"),
                f"{step_avg:.2f}" if step_avg else "–", "–", "–", f"{peak_cell} / –", result]

    # 2. benchmarks against the reference scripts
    def benches(self, data: tuple[str, str, str] | None) -> None:
        for stack in BENCH_STACKS:
            phase = f"bench:{stack}"
            script = getattr(self.args, f"{stack}_ref")
            if self.left() <= 5:
                self.fail_row(stack, f"not run: the {self.budget:.0f} s budget was spent")
                continue
            if script is None and self.dry:
                script_path = None
            else:
                script_path = Path(script or REPO / ".reference" / f"{stack}_train_gpt.py")
                if not script_path.is_file():
                    self.fail_row(stack, f"not run: reference {script_path} missing (docs/performance.md, 'Device check')")
                    continue
            json_path = self.out / f"bench_{stack}.json"
            if self.dry:
                argv = self.pgolf("bench", stack, "--toy", "--steps", str(DRY_BENCH_STEPS), "--warmup-steps", str(DRY_BENCH_WARMUP))
            else:
                path, tok, _ = data
                argv = self.pgolf("bench", stack, "--steps", str(BENCH_STEPS), "--warmup-steps", str(BENCH_WARMUP),
                                  "--set", f"data.path={json.dumps(path)}", "--set", f"data.tokenizer={json.dumps(tok)}")
                if data[2] == "real":
                    argv += ["--val-tokens", str(VAL_TOKENS)]
            if script_path is not None:
                argv += ["--reference", str(script_path.resolve())]
            argv += ["--json", str(json_path)]
            job = self.job(f"bench-{stack}", argv)
            job.finish(self.deadline(phase))
            self.keep_log(f"bench {stack}", job)
            self.rows.append(self.bench_row(stack, job, json_path, data[2] if data else "toy sample"))

    def bench_row(self, stack: str, job: Job, json_path: Path, data_kind: str) -> list[str]:
        if job.returncode != 0 or job.timed_out or not json_path.is_file():
            self.failed = True
            result = job.failure() if (job.returncode != 0 or job.timed_out) else "FAILED: no JSON written"
            self.details.append({"check": BENCH_CHECK, "stack": stack, "command": job.argv, "exit": job.returncode, "timed_out": job.timed_out, "result": result})
            return [BENCH_CHECK, stack, self.date, self.device, self.torch, self.attention, "–", "–", "–", "–", "–", result]
        b = json.loads(json_path.read_text())
        pg, ref, ratio = b["pgolf"], b.get("reference"), b.get("ratio") or {}
        pg_avg = pg["step_ms"]["mean"]
        ref_avg = ref["step_avg_ms"] if ref else None

        def mib(x):
            return "n/a" if x is None else f"{x:.0f}"

        peak = f"{mib(pg['peak_mem_mib'])}{'' if pg['peak_mem_kind'] == 'cuda_max_allocated' else ' (max RSS)'} / {mib(ref['peak_mem_mib']) if ref else '–'}"
        parts = [f"ok, {pg['tokens_per_s']:,.0f} tokens/s", f"{data_kind} data"]
        if pg.get("mfu"):
            parts.insert(1, f"MFU {100 * pg['mfu']:.1f}%")
        if ratio.get("peak_mem"):
            parts.append(f"memory ratio {ratio['peak_mem']:.3f}")
        if not ref:
            parts.append("reference not run (no CPU reference script given)")
        result = ", ".join(parts)
        self.details.append({"check": BENCH_CHECK, "stack": stack, "command": job.argv, "exit": 0, "wall_s": job.wall_s, "json": json_path.name,
                             "steps": b["steps"], "pgolf_step_avg_ms": pg_avg, "reference_step_avg_ms": ref_avg, "ratio": ratio, "result": result})
        return [BENCH_CHECK, stack, self.date, self.device, self.torch, self.attention, str(b["steps"]), f"{pg_avg:.2f}",
                f"{ref_avg:.2f}" if ref_avg is not None else "–", f"{ratio['step_avg']:.3f}" if ratio.get("step_avg") else "–", peak, result]

    def fail_row(self, stack: str, why: str) -> None:
        self.failed = True
        self.say(f"bench {stack}: {why}")
        self.details.append({"check": BENCH_CHECK, "stack": stack, "result": why})
        self.rows.append([BENCH_CHECK, stack, self.date, self.device, self.torch, self.attention, "–", "–", "–", "–", "–", why])

    def bench_data(self) -> tuple[str, str, str] | None:
        """The sp1024 shards: the challenge's if they are here, else synthetic ones of the benchmark's size."""
        if self.dry:
            return None
        if self.args.data:
            return str(Path(self.args.data).resolve()), str(Path(self.args.tokenizer).resolve()), "real"
        real = REPO / "data" / "datasets" / "fineweb10B_sp1024"
        tok = REPO / "data" / "tokenizers" / "fineweb_1024_bpe.model"
        if list(real.glob("fineweb_train_*.bin")) and list(real.glob("fineweb_val_*.bin")) and tok.is_file():
            return str(real), str(tok), "real"
        return str(write_synthetic_shards(self.work / "synthetic_sp1024")), str(REPO / "pgolf_core" / "sample" / "fineweb_1024_bpe.model"), "synthetic"

    def write(self) -> None:
        doc_in = Path(self.args.doc) if self.args.doc else DOC
        text = update_doc(doc_in.read_text(encoding="utf-8"), self.rows)
        copy = self.out / "performance.md"
        copy.write_text(text, encoding="utf-8")
        if not self.dry or self.args.doc:
            target = doc_in
            if self.dry and target.resolve() == DOC.resolve():
                raise CheckError("a CPU dry run does not write docs/performance.md; give --doc a copy")
            target.write_text(text, encoding="utf-8")
            self.say(f"rows written to {target}")
        self.say(f"rows written to {copy}")
        (self.out / "gpu_check.json").write_text(json.dumps({"rows": self.rows, "details": self.details}, indent=2) + "\n", encoding="utf-8")

    def run(self) -> int:
        try:
            self.environment()
            self.runs()
            self.benches(self.bench_data())
            self.write()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)  # run directories, synthetic shards: gpu_check.log keeps their tails
        for r in self.rows:
            self.say(_row(r))
        self.say(f"gpu_check: {'FAILED' if self.failed else 'ok'} in {time.monotonic() - self.start:.0f} s")
        return 1 if self.failed else 0


def write_synthetic_shards(dest: Path) -> Path:
    """Challenge-format shards (256 int32 header: magic, version, count; then uint16 tokens) of uniform random
    sp1024 tokens: enough training tokens for the benchmark's steps at the records' 786,432-token batch, and
    the validation slice. Step time does not depend on which tokens a batch holds."""
    import numpy as np

    from pgolf_core.data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION

    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("fineweb_train_000000.bin", (BENCH_STEPS + BENCH_WARMUP + 8) * 786_432), ("fineweb_val_000000.bin", VAL_TOKENS + 1)):
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, n
        with open(dest / name, "wb") as fh:
            fh.write(header.tobytes())
            fh.write(rng.integers(0, 1024, size=n, dtype=np.uint16).astype("<u2").tobytes())
    return dest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="the same commands on CPU at tiny sizes; rows go to a copy in --out")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / ".reference" / "gpu_check"), help="where the outputs go (default: $OUT, else .reference/gpu_check)")
    p.add_argument("--doc", help="the document to write the rows into (default docs/performance.md; a dry run writes only the copy in --out)")
    p.add_argument("--baseline-ref", help="the official train_gpt.py (default .reference/baseline_train_gpt.py)")
    p.add_argument("--pr400-ref", help="PR #400's train_gpt.py (default .reference/pr400_train_gpt.py)")
    p.add_argument("--data", help="a directory of sp1024 shards (default data/datasets/fineweb10B_sp1024, else synthetic shards)")
    p.add_argument("--tokenizer", help="the sp1024 tokenizer for --data")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole check's time budget in seconds (default 480)")
    args = p.parse_args(argv)
    if args.data and not args.tokenizer:
        p.error("--data needs --tokenizer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return Check(args).run()
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
