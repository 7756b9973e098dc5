"""``pgolf bench``: measured step time, throughput, memory and MFU of a stack, optionally side by side with
its reference ``train_gpt.py``.

The measurement reuses the training loop's own parts (``Trainer.warmup``, ``Trainer.train_step`` and the
loop events), so what is timed is what a run does per step, not a re-implementation of it. The stack is
forced to a fixed iteration count (no wallclock schedule, no periodic validation, no logging): the schedule's
horizon is the number of timed steps, as in a reference run with ``ITERATIONS`` set to that number.

A timed step is everything the loop does between two steps: the schedule, ``on_step_start``, forward and
backward over every micro-batch, the optimizer, ``after_optimizer_step`` (EMA/SWA updates) and
``on_step_end``, with the device synchronised before and after. Nothing is written unless ``--json PATH``
is given; with ``--reference`` the reference script runs in a temporary directory that is removed after.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np

from .errors import PgolfError
from .logparse import parse_log

H100_DENSE_BF16_TFLOPS = 989.0
"""H100 SXM dense bf16 tensor-core peak (the challenge's scoring hardware); ``--peak-tflops`` for others."""

FLOPS_FORMULA = "6*N_matmul + 6*L*T*d_attn"
FLOPS_DOC = (
    "training FLOPs per token = 6*N_matmul (forward 2 + backward 4 per weight per token) + 6*L*T*d_attn "
    "(causal attention: QK^T and AV cost 4*T*d_attn per token per layer over full context, halved by the "
    "causal mask, x3 for forward+backward); N_matmul = 2-D nn.Linear weights + the tied output head "
    "(vocab x model_dim); L = num_layers, T = train_seq_len, d_attn = num_heads*head_dim. The PaLM convention "
    "(no causal halving) would add another 6*L*T*d_attn."
)

_TRAIN_TIME = re.compile(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms")
_PEAK_MEM = re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
_FINAL_EVAL = re.compile(r"^(final_\w+) val_loss:(\S+) val_bpb:(\S+).*?eval_time:(\d+)ms")


_WORKER_ENV = "PGOLF_BENCH_WORKER"  # set by the launcher of a multi-process benchmark for its workers


class BenchError(PgolfError):
    """The benchmark cannot run as asked (bad arguments, the reference script failed or logged nothing)."""


# -- FLOPs ----------------------------------------------------------------------------------------------------
@attrs.define(frozen=True)
class FlopsEstimate:
    """Model FLOPs per trained token, from parameter counts and the attention geometry.

    Only matrix multiplies count: the weights of ``nn.Linear`` modules (every projection in attention and
    MLP, any modifier's projections, an untied head) and, when embeddings are tied, the output head that
    reuses the ``vocab x model_dim`` token table as a matmul. Embedding lookups, norms, convolutions and
    element-wise work are left out: they are memory-bound and small, and leaving them out is the usual MFU
    convention, so the number is comparable with published ones. A layer run more than once (depth
    recurrence) is counted once, so MFU understates such models.
    """

    n_linear: int
    n_tied_head: int
    num_layers: int
    seq_len: int
    attn_width: int

    @property
    def n_matmul(self) -> int:
        return self.n_linear + self.n_tied_head

    @property
    def attention_per_token(self) -> int:
        return 6 * self.num_layers * self.seq_len * self.attn_width

    @property
    def per_token(self) -> int:
        return 6 * self.n_matmul + self.attention_per_token

    def expression(self) -> str:
        return f"6*{self.n_matmul} + 6*{self.num_layers}*{self.seq_len}*{self.attn_width}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "per_token": self.per_token,
            "formula": FLOPS_FORMULA,
            "expression": self.expression(),
            "n_matmul": self.n_matmul,
            "n_linear": self.n_linear,
            "n_tied_head": self.n_tied_head,
            "num_layers": self.num_layers,
            "seq_len": self.seq_len,
            "attn_width": self.attn_width,
            "doc": FLOPS_DOC,
        }


def estimate_flops(model: Any, stack: Any) -> FlopsEstimate:
    from torch import nn

    seen: set[int] = set()
    n_linear = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dim() == 2 and id(module.weight) not in seen:
            seen.add(id(module.weight))
            n_linear += module.weight.numel()
    m = stack.model
    tied = m.vocab_size * m.model_dim if m.tie_embeddings else 0
    return FlopsEstimate(n_linear, tied, m.num_layers, stack.data.train_seq_len, m.num_heads * m.head_dim)


# -- results --------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


@attrs.define
class PgolfRow:
    step_ms: list[float]
    train_loss: list[float]
    warmup_s: float
    warmup_steps: int
    train_batch_tokens: int
    world_size: int
    grad_accum_steps: int
    device: str
    device_name: str
    dtype: str
    compile: bool
    peak_mem_mib: float | None
    peak_mem_kind: str
    flops: FlopsEstimate
    peak_tflops: float | None
    eval: list[dict[str, Any]] = attrs.field(factory=list)
    eval_wall_ms: float | None = None
    log: list[str] = attrs.field(factory=list)

    @property
    def stats(self) -> dict[str, float]:
        return spread(self.step_ms)

    @property
    def tokens_per_s(self) -> float:
        return self.train_batch_tokens / (self.stats["median"] / 1000.0)

    @property
    def mfu(self) -> float | None:
        if not self.peak_tflops:
            return None
        return self.flops.per_token * self.tokens_per_s / (self.peak_tflops * 1e12 * self.world_size)

    @property
    def compile_estimate_s(self) -> float:
        """Warm-up time beyond what its steps cost at the measured median: the compile (and restore) overhead."""
        return max(self.warmup_s - self.warmup_steps * self.stats["median"] / 1000.0, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step_ms": self.stats,
            "step_ms_all": self.step_ms,
            "first_step_ms": self.step_ms[0],
            "tokens_per_s": self.tokens_per_s,
            "train_batch_tokens": self.train_batch_tokens,
            "train_loss": self.train_loss,
            "warmup_steps": self.warmup_steps,
            "warmup_s": self.warmup_s,
            "compile_estimate_s": self.compile_estimate_s,
            "peak_mem_mib": self.peak_mem_mib,
            "peak_mem_kind": self.peak_mem_kind,
            "mfu": self.mfu,
            "peak_tflops": self.peak_tflops,
            "world_size": self.world_size,
            "grad_accum_steps": self.grad_accum_steps,
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype,
            "compile": self.compile,
            "eval": self.eval,
            "eval_wall_ms": self.eval_wall_ms,
        }


@attrs.define
class ReferenceRow:
    """What the reference's log says: step_avg at the last step (its own mean), per-step times, memory."""

    script: str
    command: list[str]
    steps: int
    step_avg_ms: float
    step_ms: list[float]  # differences of consecutive train_time values (1 ms resolution)
    train_loss: dict[int, float]
    peak_mem_mib: float | None
    peak_reserved_mib: float | None
    eval: list[dict[str, Any]]
    env: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "script": self.script,
            "command": self.command,
            "steps": self.steps,
            "step_avg_ms": self.step_avg_ms,
            "step_ms": spread(self.step_ms) if self.step_ms else None,
            "train_loss": [self.train_loss[s] for s in sorted(self.train_loss)],
            "peak_mem_mib": self.peak_mem_mib,
            "peak_reserved_mib": self.peak_reserved_mib,
            "eval": self.eval,
            "env": self.env,
        }


def parse_reference_log(text: str, steps: int) -> dict[str, Any]:
    """The numbers a challenge-format log gives: step_avg at step ``steps``, per-step times, memory, evals."""
    log = parse_log(text)
    if not log["step_avg_ms"]:
        raise BenchError("the reference printed no 'step:N/M train_loss:… train_time:…ms step_avg:…ms' lines (is TRAIN_LOG_EVERY honoured?)")
    last = max(log["step_avg_ms"])
    if last != steps:
        raise BenchError(f"the reference logged up to step {last}, not {steps}; did it stop early (wallclock cap, crash)?")
    times: dict[int, float] = {}
    peak = reserved = None
    evals = []
    for line in text.splitlines():
        line = line.strip()
        if m := _TRAIN_TIME.match(line):
            times[int(m.group(1))] = float(m.group(2))
        elif m := _PEAK_MEM.match(line):
            peak, reserved = float(m.group(1)), float(m.group(2))
        elif m := _FINAL_EVAL.match(line):
            evals.append({"name": m.group(1), "val_loss": float(m.group(2)), "val_bpb": float(m.group(3)), "eval_ms": float(m.group(4))})
    step_ms = [times[s] - times[s - 1] for s in sorted(times) if s - 1 in times]
    if 1 in times:
        step_ms.insert(0, times[1])
    return {
        "step_avg_ms": log["step_avg_ms"][last],
        "step_ms": step_ms,
        "train_loss": log["train_loss"],
        "peak_mem_mib": peak,
        "peak_reserved_mib": reserved,
        "eval": evals,
    }


def compare(pgolf: PgolfRow, reference: ReferenceRow) -> dict[str, Any]:
    """pgolf / reference. Step time: pgolf's mean over its timed steps against the reference's step_avg at
    the same step (both means over the same steps, the first one included). Memory only when both are the
    CUDA allocator's peak; evaluation by matching line names."""
    pg_mean = pgolf.stats["mean"]
    out: dict[str, Any] = {"step_avg": pg_mean / reference.step_avg_ms}
    if reference.step_ms:
        ref_median = spread(reference.step_ms)["median"]
        out["step_median"] = pgolf.stats["median"] / ref_median if ref_median > 0 else None
    if pgolf.peak_mem_kind == "cuda_max_allocated" and pgolf.peak_mem_mib and reference.peak_mem_mib:
        out["peak_mem"] = pgolf.peak_mem_mib / reference.peak_mem_mib
    else:
        out["peak_mem"] = None
    ref_eval = {e["name"]: e["eval_ms"] for e in reference.eval}
    out["eval"] = {e["name"]: e["eval_ms"] / ref_eval[e["name"]] for e in pgolf.eval if ref_eval.get(e["name"])}
    return out


def loss_band(reference_curves: list[list[float]], curve: list[float]) -> dict[str, Any]:
    """Seed-to-seed band of the reference's train loss and whether ``curve`` stays inside it.

    The band at each step is [min, max] over the reference seeds; ``inside`` is the fraction of steps of
    ``curve`` within it and ``worst`` the largest distance outside (0 when always inside).
    """
    if len(reference_curves) < 2:
        raise BenchError("a seed band needs at least two reference curves")
    n = min(len(curve), *(len(c) for c in reference_curves))
    if n == 0:
        raise BenchError("empty loss curve")
    ref = np.asarray([c[:n] for c in reference_curves], dtype=np.float64)
    lo, hi = ref.min(axis=0), ref.max(axis=0)
    ours = np.asarray(curve[:n], dtype=np.float64)
    outside = np.maximum(lo - ours, 0.0) + np.maximum(ours - hi, 0.0)
    return {
        "steps": n,
        "inside": float((outside == 0).mean()),
        "worst": float(outside.max()),
        "worst_step": int(outside.argmax()) + 1,
        "band_width_mean": float((hi - lo).mean()),
    }


# -- the pgolf measurement ------------------------------------------------------------------------------------
def bench_stack(stack: Any, steps: int, warmup_steps: int) -> Any:
    """The stack as the benchmark runs it: fixed iterations, no wallclock cap, no validation, no logging."""
    run = attrs.evolve(
        stack.run, iterations=steps, warmup_steps=warmup_steps, max_wallclock_seconds=0.0, val_loss_every=0, train_log_every=0
    )
    return attrs.evolve(stack, run=run)


def _peak_memory(runtime: Any) -> tuple[float | None, str]:
    import torch

    if runtime.is_cuda:
        value = torch.cuda.max_memory_allocated(runtime.device) / 2**20
        kind = "cuda_max_allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        value = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
        kind = "max_rss"
    if runtime.distributed:
        t = torch.tensor([value], dtype=torch.float64, device=runtime.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        value = float(t.item())
    return value, kind


def measure(stack: Any, registry: Any, steps: int, warmup_steps: int, peak_tflops: float | None, run_eval: bool = False) -> PgolfRow:
    """Build data and the trainer for ``stack`` (already forced by ``bench_stack``), warm up, time ``steps``."""
    import torch

    from .runtime import setup_runtime
    from .train import Trainer, load_data

    runtime = setup_runtime(stack)
    lines: list[str] = []

    def log(msg: str, console: bool = True) -> None:
        lines.append(msg)

    try:
        data_files = load_data(stack, runtime.device, registry)
        trainer = Trainer(stack, registry, runtime, data_files, log, lambda **kw: None)
        runtime.sync()  # the peak is not reset: like the reference's, it covers the whole process
        t = time.perf_counter()
        trainer.warmup(warmup_steps)
        runtime.sync()
        warmup_s = time.perf_counter() - t

        state, events, schedule = trainer.state, trainer.events, trainer.schedule
        trainer.model.train()
        events.fire("on_train_start", state)
        step_ms: list[float] = []
        losses: list[float] = []
        elapsed_ms = 0.0
        for step in range(steps):
            runtime.sync()
            t0 = time.perf_counter()
            scale = schedule.lr_mul(step, elapsed_ms)
            state.step, state.lr_scale = step, scale
            events.fire("on_step_start", state)
            loss = trainer.train_step(step, scale)
            state.step, state.train_time_ms = step + 1, elapsed_ms
            events.fire("after_optimizer_step", state)
            events.fire("on_step_end", state)
            runtime.sync()
            ms = 1000.0 * (time.perf_counter() - t0)
            elapsed_ms += ms
            step_ms.append(ms)
            losses.append(float(loss.item()))
        peak, kind = _peak_memory(runtime)
        evals: list[dict[str, Any]] = []
        eval_wall_ms = None
        if run_eval:
            runtime.sync()
            t = time.perf_counter()
            results = trainer.evaluator.evaluate(trainer.model, trainer.eval_env, trainer.quantizer.label, trainer.compressor.label)
            runtime.sync()
            eval_wall_ms = 1000.0 * (time.perf_counter() - t)
            evals = [{"name": r.name, "val_loss": r.val_loss, "val_bpb": r.val_bpb, "eval_ms": r.eval_ms} for r in results]
        device_name = torch.cuda.get_device_name(runtime.device) if runtime.is_cuda else "cpu"
        row = PgolfRow(
            step_ms=step_ms,
            train_loss=losses,
            warmup_s=warmup_s,
            warmup_steps=warmup_steps,
            train_batch_tokens=stack.data.train_batch_tokens,
            world_size=runtime.world_size,
            grad_accum_steps=runtime.grad_accum_steps,
            device=runtime.device.type,
            device_name=device_name,
            dtype="bf16" if runtime.bf16 else "fp32",
            compile=runtime.compile,
            peak_mem_mib=peak,
            peak_mem_kind=kind,
            flops=estimate_flops(trainer.base_model, stack),
            peak_tflops=peak_tflops if peak_tflops is not None else (H100_DENSE_BF16_TFLOPS if runtime.is_cuda else None),
            eval=evals,
            eval_wall_ms=eval_wall_ms,
            log=lines,
        )
        is_master = runtime.is_master
    finally:
        runtime.shutdown()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the reference runs next in another process
    return row if is_master else None


# -- the reference run ----------------------------------------------------------------------------------------
def reference_env(stack: Any, registry: Any, steps: int, warmup_steps: int, data_path: str, tokenizer_path: str, extra: dict[str, str]) -> dict[str, str]:
    """The stack's variables (``pgolf config --as-env``), then the benchmark's fixed ones, then ``--reference-env``."""
    from .envexport import stack_to_env

    env = dict(stack_to_env(stack, registry).variables)
    env.update(
        ITERATIONS=str(steps),
        WARMUP_STEPS=str(warmup_steps),
        MAX_WALLCLOCK_SECONDS="0",
        VAL_LOSS_EVERY="0",
        TRAIN_LOG_EVERY="1",
        DATA_PATH=str(Path(data_path).resolve()),
        TOKENIZER_PATH=str(Path(tokenizer_path).resolve()),
        RUN_ID="pgolf_bench_reference",
    )
    env.update(extra)
    return env


def run_reference(
    script: Path, env: dict[str, str], steps: int, nproc: int, wait_for_eval: bool, echo: Callable[[str], None] | None = None
) -> ReferenceRow:
    """Run the script in a temporary directory (it writes logs/ and model files into its cwd).

    Unless evaluation is wanted it is stopped once it has logged its peak memory (right after training and
    the last-step validation): quantizing and a full evaluation add nothing to the step-time comparison.
    """
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    else:
        command = [sys.executable, str(script)]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    stopped = False
    with tempfile.TemporaryDirectory(prefix="pgolf-bench-ref-") as cwd:
        proc = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                lines.append(line)
                if echo is not None:
                    echo(line)
                if not wait_for_eval and _PEAK_MEM.match(line.strip()):
                    stopped = True
                    _stop(proc)
                    break
            proc.wait()
        finally:
            if proc.poll() is None:
                _stop(proc)
    if proc.returncode != 0 and not stopped:
        tail = " | ".join(line for line in lines[-3:] if line.strip()) or "no output"
        raise BenchError(f"reference {script} exited with status {proc.returncode}: {tail}")
    parsed = parse_reference_log("\n".join(lines), steps)
    return ReferenceRow(script=str(script), command=command, steps=steps, env=env, **parsed)


def _stop(proc: subprocess.Popen) -> None:
    """End the reference's process group (torchrun and its workers), which this benchmark started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- a fixed validation slice ---------------------------------------------------------------------------------
def make_val_slice(data_path: str, n_tokens: int, dest: Path) -> Path:
    """A data directory with the same training shards (links) and the first ``n_tokens`` validation tokens as
    one shard, so pgolf and the reference evaluate exactly the same fixed slice."""
    from .data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, TRAIN_PATTERN, VAL_PATTERN, load_shard, shard_files

    dest.mkdir(parents=True, exist_ok=True)
    for f in shard_files(data_path, TRAIN_PATTERN, "training"):
        (dest / f.name).symlink_to(f.resolve())
    chunks, have = [], 0
    for f in shard_files(data_path, VAL_PATTERN, "validation"):
        tokens = load_shard(f).numpy()
        chunks.append(tokens[: n_tokens - have])
        have += len(chunks[-1])
        if have >= n_tokens:
            break
    if have < n_tokens:
        raise BenchError(f"--val-tokens {n_tokens}: the validation split of {data_path} has only {have} tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    out = dest / "fineweb_val_000000.bin"
    with open(out, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(np.concatenate(chunks).astype("<u2").tobytes())
    return dest


# -- output ---------------------------------------------------------------------------------------------------
def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_report(stack_path: str, row: PgolfRow, steps: int, reference: ReferenceRow | None, ratio: dict[str, Any] | None) -> str:
    s = row.stats
    mode = f"{row.dtype}, {'compiled' if row.compile else 'eager'}"
    out = [
        f"pgolf bench {stack_path}: {steps} timed steps after {row.warmup_steps} warm-up steps, "
        f"{row.device_name} ({mode}), {row.world_size} process(es) x {row.grad_accum_steps} micro-batches, "
        f"{row.train_batch_tokens} tokens/step",
        f"  step time     median {s['median']:.2f} ms  mean {s['mean']:.2f}  p10 {s['p10']:.2f}  p90 {s['p90']:.2f}  "
        f"min {s['min']:.2f}  max {s['max']:.2f}  (first {row.step_ms[0]:.2f})",
        f"  tokens/s      {row.tokens_per_s:.0f}  (tokens per step / median step time)",
        f"  warm-up       {row.warmup_s:.2f} s for {row.warmup_steps} steps, compile and restore ~{row.compile_estimate_s:.2f} s",
    ]
    if row.peak_mem_kind == "cuda_max_allocated":
        out.append(f"  peak memory   {_fmt_mib(row.peak_mem_mib)} MiB  (torch.cuda.max_memory_allocated)")
    else:
        out.append(f"  peak memory   {_fmt_mib(row.peak_mem_mib)} MiB  (max RSS of the process; no allocator peak on CPU)")
    f = row.flops
    out.append(f"  FLOPs/token   {f.per_token:.4g} = {FLOPS_FORMULA} = {f.expression()}  (training, causal attention)")
    if row.mfu is None:
        out.append("  MFU           n/a  (no device peak on CPU; pass --peak-tflops)")
    else:
        out.append(f"  MFU           {100 * row.mfu:.2f}%  (FLOPs/token x tokens/s / ({row.peak_tflops:g} TFLOP/s x {row.world_size}))")
    for e in row.eval:
        out.append(f"  eval          {e['name']} val_bpb {e['val_bpb']:.4f} eval_time {e['eval_ms']:.0f} ms")
    if reference is None or ratio is None:
        return "\n".join(out) + "\n"
    ref_median = spread(reference.step_ms)["median"] if reference.step_ms else float("nan")
    out += [
        "",
        f"  {'':<10} {'step_avg ms':>12} {'median ms':>10} {'tokens/s':>10} {'peak MiB':>9} {'loss@' + str(steps):>10}",
        f"  {'pgolf':<10} {s['mean']:>12.2f} {s['median']:>10.2f} {row.train_batch_tokens / (s['mean'] / 1000):>10.0f} "
        f"{_fmt_mib(row.peak_mem_mib):>9} {row.train_loss[-1]:>10.4f}",
        f"  {'reference':<10} {reference.step_avg_ms:>12.2f} {ref_median:>10.2f} {row.train_batch_tokens / (reference.step_avg_ms / 1000):>10.0f} "
        f"{_fmt_mib(reference.peak_mem_mib):>9} {reference.train_loss.get(steps, float('nan')):>10.4f}",
        f"  ratio pgolf/reference: step_avg {ratio['step_avg']:.3f} (target <= 1.00)"
        + (f", median step {ratio['step_median']:.3f}" if ratio.get("step_median") else "")
        + (f", peak memory {ratio['peak_mem']:.3f}" if ratio.get("peak_mem") else ", peak memory n/a (not both CUDA allocator peaks)"),
    ]
    for e in reference.eval:
        mine = next((p for p in row.eval if p["name"] == e["name"]), None)
        pair = f" vs pgolf {mine['eval_ms']:.0f} ms (ratio {ratio['eval'][e['name']]:.3f})" if mine and e["name"] in ratio["eval"] else ""
        out.append(f"  reference eval {e['name']} eval_time {e['eval_ms']:.0f} ms{pair}")
    return "\n".join(out) + "\n"


# -- the command ----------------------------------------------------------------------------------------------
def _parse_kv(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise BenchError(f"--reference-env {item}: expected NAME=VALUE")
        out[name] = value
    return out


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise BenchError(f"--steps {args.steps}: must be >= 1")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise BenchError(f"--warmup-steps {args.warmup_steps}: must be >= 0")
    if args.peak_tflops is not None and not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        raise BenchError(f"--peak-tflops {args.peak_tflops}: must be a positive number")
    if args.val_tokens is not None and args.val_tokens < 1:
        raise BenchError(f"--val-tokens {args.val_tokens}: must be >= 1")
    if args.reference and not Path(args.reference).is_file():
        raise BenchError(f"--reference {args.reference}: file not found")


def cmd_bench(args: argparse.Namespace, stack: Any, registry: Any, nproc: int) -> int:
    _check_args(args)
    from .procenv import read_process_env

    under_torchrun = read_process_env().distributed
    worker = under_torchrun and os.environ.get(_WORKER_ENV) == "1"
    if under_torchrun and not worker and args.reference:
        raise BenchError("--reference under torchrun: run 'pgolf bench STACK --nproc-per-node N --reference ...' without torchrun; it launches both")
    warmup = stack.run.warmup_steps if args.warmup_steps is None else args.warmup_steps
    extra_env = _parse_kv(args.reference_env)
    if getattr(args, "threads_line", None):
        print(args.threads_line, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pgolf-bench-data-") as tmp:
        if args.val_tokens is not None:
            from .train import resolve_data_paths

            data_path, tok_path = resolve_data_paths(stack)
            sliced = make_val_slice(data_path, args.val_tokens, Path(tmp) / "data")
            stack = attrs.evolve(stack, data=attrs.evolve(stack.data, path=str(sliced), tokenizer=tok_path))
        forced = bench_stack(stack, args.steps, warmup)
        if nproc > 1 and not under_torchrun:
            row = _measure_under_torchrun(args, forced, nproc, Path(tmp), warmup)
        else:
            row = measure(forced, registry, args.steps, warmup, args.peak_tflops, run_eval=args.eval)
            if row is None:  # not rank 0
                return 0
        if worker:  # rank 0 of a multi-process benchmark this command launched: the launcher reports
            _write_json(args.json, {"pgolf": _row_state(row)})
            return 0
        reference = ratio = None
        if args.reference:
            from .train import resolve_data_paths

            data_path, tok_path = resolve_data_paths(stack)
            env = reference_env(stack, registry, args.steps, warmup, data_path, tok_path, extra_env)
            echo = (lambda line: print(f"reference: {line}", file=sys.stderr)) if args.verbose else None
            reference = run_reference(Path(args.reference).resolve(), env, args.steps, nproc, args.eval, echo)
            ratio = compare(row, reference)
    if args.verbose:
        for line in row.log:
            print(f"pgolf: {line}", file=sys.stderr)
    print(format_report(stack.path, row, args.steps, reference, ratio), end="")
    if args.json:
        import torch

        from . import __version__

        _write_json(
            args.json,
            {
                "stack": stack.path,
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "pgolf_version": __version__,
                "torch": torch.__version__,
                "steps": args.steps,
                "warmup_steps": warmup,
                "overrides": list(stack.overrides),
                "flops": row.flops.as_dict(),
                "pgolf": row.as_dict(),
                "reference": reference.as_dict() if reference else None,
                "ratio": ratio,
            },
        )
    return 0


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    text = json.dumps(payload, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        from .rundir import atomic_write

        atomic_write(Path(path), text.encode("utf-8"))


def _row_state(row: PgolfRow) -> dict[str, Any]:
    d = attrs.asdict(row, recurse=False)
    d["flops"] = attrs.asdict(row.flops)
    return d


def _measure_under_torchrun(args: argparse.Namespace, stack: Any, nproc: int, tmp: Path, warmup: int) -> PgolfRow:
    """Relaunch this benchmark under torchrun (one process per GPU) and read rank 0's row back."""
    out = tmp / "pgolf_row.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pgolf_core", "bench", args.stack]
    cmd += ["--steps", str(args.steps), "--warmup-steps", str(warmup), "--json", str(out)]
    for expr in args.set or []:
        cmd += ["--set", expr]
    if args.val_tokens is not None:  # the launcher made the slice; the workers read it
        cmd += ["--set", f"data.path={json.dumps(stack.data.path)}", "--set", f"data.tokenizer={json.dumps(stack.data.tokenizer)}"]
    for module in args.plugin or []:
        cmd += ["--plugin", module]
    if args.legacy_env:
        cmd.append("--legacy-env")
    if getattr(args, "toy", False):
        cmd.append("--toy")
    if args.peak_tflops is not None:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.eval:
        cmd.append("--eval")
    env = {**os.environ, _WORKER_ENV: "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    print("launching: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise BenchError(f"the {nproc}-process benchmark exited with status {proc.returncode} (its output is above)")
    state = json.loads(out.read_text())["pgolf"]
    state["flops"] = FlopsEstimate(**state["flops"])
    return PgolfRow(**state)
