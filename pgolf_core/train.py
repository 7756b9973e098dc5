"""The pipeline: data → model build → train (wallclock cap) → average → quantize → compress → size
accounting → round trip → evaluate → report.

The loop follows the official ``train_gpt.py`` step for step (same data order, same warmup-and-restore,
same schedule evaluation points, same log lines), so that a stack reproduces its reference's losses.
Techniques are reached only at build time and at loop boundaries.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import platform
import random
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__
from .artifact import build_artifact, code_bytes, load_artifact
from .config.dump import stack_to_toml
from .config.schema import Stack
from .data import TRAIN_PATTERN, VAL_PATTERN, DistributedTokenLoader, load_validation_tokens, read_shard_header, shard_files
from .errors import BudgetError, DataError
from .evaluate import EvalEnv, ValData, eval_val
from .model.gpt import build_model, count_parameters
from .model.layers import cast_for_device
from .model.spec import BuildContext
from .registry import Registry
from .rundir import RunDir
from .runtime import Runtime
from .sample import build_sample, is_sample, tokenizer_path
from .tokenizer import byte_luts, load_tokenizer


@attrs.define
class TrainState:
    """What loop events see. ``model`` is the uncompiled module whose weights are trained."""

    stack: Stack
    runtime: Runtime
    model: nn.Module
    optimizers: Any
    log: Any
    step: int = 0
    iterations: int = 0
    lr_scale: float = 1.0
    train_time_ms: float = 0.0
    train_loss: float | None = None
    last_val: tuple[float, float] | None = None


class Events:
    """Loop events, delivered in stack order to the built technique objects, then to pluggy observers."""

    NAMES = ("on_train_start", "after_optimizer_step", "on_step_end", "on_eval_start", "on_eval_end", "on_train_end")

    def __init__(self, objects: list[Any], registry: Registry) -> None:
        self.handlers = {n: [getattr(o, n) for o in objects if callable(getattr(o, n, None))] for n in self.NAMES}
        self.hooks = registry.pm.hook

    def fire(self, name: str, state: TrainState) -> None:
        for handler in self.handlers[name]:
            handler(state)
        getattr(self.hooks, f"pgolf_{name}")(state=state)


def resolve_data_paths(stack: Stack) -> tuple[str, str]:
    data_path, tok_path = stack.data.path, stack.data.tokenizer
    if is_sample(data_path):
        data_path = str(build_sample(data_path))
    if is_sample(tok_path):
        tok_path = tokenizer_path(tok_path)
    return data_path, tok_path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_slot(stack: Stack, registry: Registry, slot: str) -> Any:
    reg = registry.get(slot, stack.technique(slot))
    ctx = BuildContext(stack.model, stack.run, stack.data)
    return reg.technique.build(stack.params(slot), ctx)


@attrs.define
class DataFiles:
    """Everything read from disk before a run starts, so bad data fails before anything is written."""

    data_path: str
    tokenizer_path: str
    train_files: list[Path]
    val: ValData


def load_data(stack: Stack, device: torch.device) -> DataFiles:
    data_path, tok_path = resolve_data_paths(stack)
    vocab = stack.model.vocab_size
    sp = load_tokenizer(tok_path, vocab)
    train_files = shard_files(data_path, TRAIN_PATTERN, "training")
    for f in train_files:
        read_shard_header(f)
    val_files = shard_files(data_path, VAL_PATTERN, "validation")
    val_tokens = load_validation_tokens(val_files, stack.data.train_seq_len, vocab)
    return DataFiles(data_path, tok_path, train_files, ValData(val_tokens, *byte_luts(sp, vocab, device)))


def run_training(stack: Stack, registry: Registry, runtime: Runtime, rundir: RunDir, data_files: DataFiles) -> dict[str, Any]:
    log = rundir.log
    args, data = stack.run, stack.data
    resolved_toml = stack_to_toml(stack)
    rundir.write_text("stack.toml", resolved_toml)
    log(resolved_toml, console=False)
    log("=" * 100, console=False)
    log(f"pgolf {__version__} python {platform.python_version()} torch {torch.__version__}", console=False)
    for slot, choice in stack.slots.items():
        log(f"technique:{slot}={choice.technique} ({choice.distribution} {choice.version})", console=False)
    for i, mod in enumerate(stack.modifiers):
        log(f"technique:modifier[{i}]={mod.technique} layers={mod.layers!r} ({mod.distribution} {mod.version})", console=False)
    for line in stack.legacy_env:
        log(f"legacy_env: {line}")
    log("=" * 100, console=False)

    seed_everything(args.seed)
    device = runtime.device
    val = data_files.val
    eval_env = EvalEnv(
        val, data.train_seq_len, data.val_batch_size, runtime.grad_accum_steps, runtime.rank, runtime.world_size, device, runtime.autocast
    )
    train_files, data_path, vocab = data_files.train_files, data_files.data_path, stack.model.vocab_size
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={data_files.tokenizer_path}")
    log(f"train_loader:dataset:{Path(data_path).name} train_shards:{len(train_files)}")
    log(f"val_loader:shards pattern={data_path}/{VAL_PATTERN} tokens:{val.tokens.numel() - 1}")

    # Model and optimizers -------------------------------------------------------------------------------
    base_model, modifier_objects = build_model(stack, registry)
    base_model = base_model.to(device)
    cast_for_device(base_model, runtime.bf16)
    compiled = torch.compile(base_model, dynamic=False, fullgraph=True) if runtime.compile else base_model
    if runtime.distributed:
        with warnings.catch_warnings():  # the reference's broadcast_buffers=False, kept for identical behaviour
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            model: nn.Module = DDP(compiled, device_ids=[runtime.local_rank] if runtime.is_cuda else None, broadcast_buffers=False)
    else:
        model = compiled
    optimizers = build_slot(stack, registry, "optimizer")(base_model, runtime)
    schedule = build_slot(stack, registry, "schedule")
    averaging = build_slot(stack, registry, "averaging")
    quantizer = build_slot(stack, registry, "quantizer")
    compressor = build_slot(stack, registry, "compressor")
    evaluator = build_slot(stack, registry, "evaluator")

    n_params = count_parameters(base_model)
    m = stack.model
    log(f"model_params:{n_params}")
    log(f"world_size:{runtime.world_size} grad_accum_steps:{runtime.grad_accum_steps}")
    log(f"device:{device.type} dtype:{'bf16' if runtime.bf16 else 'fp32'} compile:{runtime.compile}")
    log(f"attention_mode:gqa num_heads:{m.num_heads} num_kv_heads:{m.num_kv_heads}")
    log(
        f"train_batch_tokens:{data.train_batch_tokens} train_seq_len:{data.train_seq_len} "
        f"iterations:{args.iterations} warmup_steps:{args.warmup_steps} max_wallclock_seconds:{args.max_wallclock_seconds:.3f}"
    )
    log(f"seed:{args.seed}")

    loader = DistributedTokenLoader(train_files, runtime.rank, runtime.world_size, device, vocab)
    grad_accum = runtime.grad_accum_steps
    grad_scale = 1.0 / grad_accum

    def forward_backward() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            if runtime.distributed:
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            x, y = loader.next_batch(data.train_batch_tokens, data.train_seq_len, grad_accum)
            with runtime.autocast():
                loss = model(x, y)
            total += loss.detach()
            (loss * grad_scale).backward()
        return total / grad_accum

    # Warmup primes compiled paths, then restores the initial weights, optimizer state and data stream.
    if args.warmup_steps > 0:
        initial_model = {k: v.detach().cpu().clone() for k, v in base_model.state_dict().items()}
        initial_opt = copy.deepcopy(optimizers.state_dict())
        model.train()
        for warmup_step in range(args.warmup_steps):
            optimizers.zero_grad()
            forward_backward()
            optimizers.step(base_model)
            optimizers.zero_grad()
            if args.warmup_steps <= 20 or (warmup_step + 1) % 10 == 0 or warmup_step + 1 == args.warmup_steps:
                log(f"warmup_step:{warmup_step + 1}/{args.warmup_steps}")
        base_model.load_state_dict(initial_model, strict=True)
        optimizers.load_state_dict(initial_opt)
        optimizers.zero_grad()
        if runtime.distributed:
            model.require_backward_grad_sync = True
        loader = DistributedTokenLoader(train_files, runtime.rank, runtime.world_size, device, vocab)

    # Main loop -------------------------------------------------------------------------------------------
    state = TrainState(stack, runtime, base_model, optimizers, log, iterations=args.iterations)
    events = Events([schedule, averaging, quantizer, compressor, evaluator, *modifier_objects], registry)
    max_wallclock_ms = 1000.0 * args.max_wallclock_seconds if args.max_wallclock_seconds > 0 else None
    stop_after_step: int | None = None
    training_time_ms = 0.0
    events.fire("on_train_start", state)
    runtime.sync()
    t0 = time.perf_counter()
    step = 0
    while True:
        last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
        if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            runtime.sync()
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            state.step, state.train_time_ms = step, training_time_ms
            events.fire("on_eval_start", state)
            val_loss, val_bpb = eval_val(model, eval_env)
            state.last_val = (val_loss, val_bpb)
            events.fire("on_eval_end", state)
            log(
                f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms"
            )
            rundir.metric(kind="val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=training_time_ms)
            runtime.sync()
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < args.iterations:
                log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{args.iterations}")
            break

        elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        scale = schedule.lr_mul(step, elapsed_ms)
        optimizers.zero_grad()
        train_loss = forward_backward()
        optimizers.before_step(step)
        optimizers.set_lr_scale(scale)
        optimizers.step(base_model)
        optimizers.zero_grad()
        step += 1
        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        state.step, state.lr_scale, state.train_time_ms = step, scale, approx_ms
        events.fire("after_optimizer_step", state)
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or stop_after_step is not None):
            loss_value = train_loss.item()
            state.train_loss = loss_value
            log(f"step:{step}/{args.iterations} train_loss:{loss_value:.4f} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms")
            rundir.metric(kind="train", step=step, train_loss=loss_value, train_time_ms=approx_ms, lr_scale=scale)
        events.fire("on_step_end", state)
        reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
        if runtime.distributed and max_wallclock_ms is not None:
            flag = torch.tensor(int(reached_cap), device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            reached_cap = bool(flag.item())
        if stop_after_step is None and reached_cap:
            stop_after_step = step
    events.fire("on_train_end", state)
    if runtime.is_cuda:
        log(
            f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 1024 // 1024} MiB"
        )

    # Export: average → quantize → compress → size accounting → round trip → final evaluation ------------
    weights = averaging.export_weights(base_model)
    if args.save_raw_model:
        rundir.write_bytes("final_model.pt", _serialize(weights))
    bytes_code = code_bytes(stack, registry, resolved_toml)
    artifact = build_artifact(weights, quantizer, compressor, bytes_code)
    label = f"{quantizer.label}+{compressor.label}"
    artifact_name = f"final_model.{quantizer.label}.ptz"
    log(f"Serialized model {label}: {artifact.bytes_model} bytes (payload:{artifact.stats['payload_bytes']} raw_torch:{artifact.raw_bytes})")
    log(f"Code size: {bytes_code} bytes")
    log(f"Total submission size {label}: {artifact.bytes_total} bytes")
    over_cap = artifact.bytes_total > args.artifact_cap_bytes
    if over_cap:
        raise BudgetError(
            f"artifact is {artifact.bytes_total} bytes (code {bytes_code} + model {artifact.bytes_model}), over the "
            f"{args.artifact_cap_bytes}-byte cap by {artifact.bytes_total - args.artifact_cap_bytes}; shrink the model or "
            "quantize harder (raise run.artifact_cap_bytes only for experiments that are not submissions)"
        )
    artifact_path = rundir.write_bytes(artifact_name, artifact.blob)
    runtime.barrier()
    blob = artifact_path.read_bytes() if runtime.is_master else artifact.blob
    if runtime.distributed:
        blob = _broadcast_bytes(blob, runtime)
    try:
        restored = load_artifact(blob, quantizer, compressor)
        base_model.load_state_dict(restored, strict=True)
    except Exception as exc:
        raise DataError(f"{artifact_path}: the artifact does not load back into the model ({exc})") from None

    runtime.sync()
    t_eval = time.perf_counter()
    results = evaluator.evaluate(model, eval_env, quantizer.label, compressor.label)
    runtime.sync()
    eval_ms = 1000.0 * (time.perf_counter() - t_eval)
    for name, loss, bpb in results:
        log(f"{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{eval_ms:.0f}ms")
        log(f"{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        rundir.metric(kind="final", name=name, val_loss=loss, val_bpb=bpb, eval_time_ms=eval_ms)
    final_name, final_loss, final_bpb = results[-1]
    summary = {
        "run_id": rundir.run_id,
        "stack": stack.path,
        "seed": args.seed,
        "steps": step,
        "train_time_ms": training_time_ms,
        "model_params": n_params,
        "bytes_code": bytes_code,
        "bytes_model": artifact.bytes_model,
        "bytes_total": artifact.bytes_total,
        "final": {name: {"val_loss": lo, "val_bpb": bp} for name, lo, bp in results},
        "compliant": bool(getattr(evaluator, "compliant", True)),
    }
    meta = stack.meta
    rundir.write_json(
        "submission.json",
        {
            "author": meta.author,
            "github_id": meta.github_id,
            "name": meta.name or stack.path,
            "blurb": meta.description,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "val_loss": round(final_loss, 8),
            "val_bpb": round(final_bpb, 8),
            "bytes_total": artifact.bytes_total,
            "bytes_code": bytes_code,
        },
    )
    rundir.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _serialize(weights: dict[str, torch.Tensor]) -> bytes:
    from .artifact import serialize

    return serialize({k: v.detach().cpu() for k, v in weights.items()})


def _broadcast_bytes(blob: bytes, runtime: Runtime) -> bytes:
    box = [blob]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
