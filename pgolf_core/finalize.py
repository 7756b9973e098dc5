"""After the training clock: average → pre-quantization score → calibrate → quantize (+fit) → compress → size
accounting → write → round trip (decode check) → final evaluation, each phase timed; then the run's results
(``summary.json``, ``submission.json``) with each final line's rule check.

Kept apart from the training loop (``pgolf_core.train``): nothing here runs per step.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from typing import Any

import dataclasses
import torch

from .artifact import build_artifact, load_artifact, serialize
from .calibration import CalibrationContext, state_kept
from .compliance import final_line_compliance, quantizer_compliance
from .contracts import Calibrating, FinalEvalAware, FinalResult
from .errors import BudgetError, DataError
from .evaluate import eval_val
from .model.roles import parameter_roles
from .rundir import RunDir
from .runtime import Runtime

EVAL_BUDGET_SECONDS = 600.0  # the challenge's evaluation limit (8xH100); CPU runs report against it only for orientation


def export_and_evaluate(trainer: Any, rundir: Any, bytes_code: int) -> tuple[Any, list[FinalResult]]:
    """Average → pre-quantization score → calibrate → quantize (+fit) → compress → size accounting → write →
    round trip (decode check) → final evaluation, each phase timed."""
    args, rt, log = trainer.stack.run, trainer.runtime, trainer.log
    quantizer, compressor = trainer.quantizer, trainer.compressor
    weights = trainer.averaging.export_weights(trainer.base_model)
    trainer.base_model.load_state_dict(weights, strict=True)
    rt.sync()
    t0 = time.perf_counter()
    pre_loss, pre_bpb = eval_val(trainer.model, trainer.eval_env)
    rt.sync()
    pre_ms = 1000.0 * (time.perf_counter() - t0)
    log(f"DIAGNOSTIC post_{trainer.stack.technique('averaging')} val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} eval_time:{pre_ms:.0f}ms")
    trainer.metric(kind="prequant", val_loss=pre_loss, val_bpb=pre_bpb, eval_time_ms=pre_ms)
    trainer.prequant = (pre_loss, pre_bpb)
    if args.save_raw_model:
        rundir.write_bytes("final_model.pt", _serialize(weights))
    if isinstance(quantizer, Calibrating):
        t0 = time.perf_counter()
        with state_kept(trainer.base_model):  # the compiled final evaluation sees the model as training left it
            quantizer.calibrate(calibration_context(trainer))
        rt.sync()
        calib_ms = 1000.0 * (time.perf_counter() - t0)
        reserve_ms = 1000.0 * trainer.reserve_s if trainer.budget_ms is not None else 0.0
        if reserve_ms > 0:
            within = "within" if calib_ms <= reserve_ms else "OVER"
            log(f"calibration:done time:{calib_ms:.0f}ms ({within} the {reserve_ms:.0f}ms reserved from the training clock)")
        else:
            log(f"calibration:done time:{calib_ms:.0f}ms (after the training clock; counted in no budget, as in PR #1019)")
        trainer.metric(kind="phase", name="calibration", time_ms=calib_ms)
    t0 = time.perf_counter()
    roles = parameter_roles(trainer.base_model)
    artifact, obj = build_artifact(weights, roles, quantizer, compressor, bytes_code, return_object=True)
    trainer.metric(kind="phase", name="quantize_compress", time_ms=1000.0 * (time.perf_counter() - t0))
    label = f"{quantizer.label}+{compressor.label}"
    log(f"Serialized model {label}: {artifact.bytes_model} bytes (payload:{artifact.stats['payload_bytes']} raw_torch:{artifact.raw_bytes})")
    log(f"Code size: {bytes_code} bytes")
    log(f"Total submission size {label}: {artifact.bytes_total} bytes")
    if artifact.bytes_total > args.artifact_cap_bytes:
        raise BudgetError(
            f"artifact is {artifact.bytes_total} bytes (code {bytes_code} + model {artifact.bytes_model}), over the "
            f"{args.artifact_cap_bytes}-byte cap by {artifact.bytes_total - args.artifact_cap_bytes}; shrink the model or "
            "quantize harder (raise run.artifact_cap_bytes only for experiments that are not submissions)"
        )
    artifact_path = rundir.write_bytes(f"final_model.{quantizer.label}.ptz", artifact.blob)
    rt.barrier()
    blob = artifact_path.read_bytes() if rt.is_master else artifact.blob
    if rt.distributed:
        blob = _broadcast_bytes(blob, rt)
    try:
        loaded = load_artifact(blob, quantizer, compressor)
    except Exception as exc:
        raise DataError(f"{artifact_path}: the artifact cannot be decoded ({exc})") from None
    # The master wrote the artifact from its own quantized object; other ranks may have quantized differently
    # (calibration on rank-local training batches, as PR #1218), and load the master's artifact like the references.
    expected = quantizer.dequantize(obj) if rt.is_master else loaded
    bad = sorted(k for k in expected if k not in loaded or not torch.equal(loaded[k], expected[k]))
    if bad or set(loaded) != set(expected):
        raise DataError(f"{artifact_path}: the artifact does not decode back to the quantized tensors ({', '.join(bad[:3]) or 'key sets differ'})")
    try:
        trainer.base_model.load_state_dict(loaded, strict=True)
    except Exception as exc:
        raise DataError(f"{artifact_path}: the artifact does not load back into the model ({exc})") from None
    for module in trainer.base_model.modules():
        if module is not trainer.base_model and isinstance(module, FinalEvalAware):
            module.prepare_final_eval()
    rt.sync()
    t0 = time.perf_counter()
    results = trainer.evaluator.evaluate(trainer.model, trainer.eval_env, quantizer.label, compressor.label)
    rt.sync()
    eval_total_ms = 1000.0 * (time.perf_counter() - t0)
    for r in results:
        extra = f" {r.note}" if r.note else ""
        log(f"{r.name} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}{extra} eval_time:{r.eval_ms:.0f}ms")
        log(f"{r.name}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
        trainer.metric(kind="final", name=r.name, val_loss=r.val_loss, val_bpb=r.val_bpb, eval_time_ms=r.eval_ms)
    budget_ms = EVAL_BUDGET_SECONDS * 1000.0
    verdict = "within" if eval_total_ms <= budget_ms else "OVER"
    log(f"eval_budget: final evaluation took {eval_total_ms:.0f}ms, {verdict} the {budget_ms:.0f}ms evaluation budget on this hardware")
    trainer.metric(kind="phase", name="final_evaluation", time_ms=eval_total_ms, budget_ms=budget_ms)
    trainer.eval_total_ms = eval_total_ms
    return artifact, results


def calibration_context(trainer: Any) -> CalibrationContext:
    """What a calibrating quantizer may use: the averaged model, the runtime, and training batches of a fresh
    loader (a source whose compliance the quantizer declares)."""
    rt, data = trainer.runtime, trainer.stack.data

    def train_batches(n: int):
        loader = trainer.new_loader()
        for _ in range(n):
            yield loader.next_batch(data.train_batch_tokens, data.train_seq_len, rt.grad_accum_steps)

    return CalibrationContext(
        model=trainer.base_model, runtime=rt, seed=trainer.stack.run.seed, train_seq_len=data.train_seq_len,
        vocab_size=trainer.stack.model.vocab_size, log=trainer.log, train_batches=train_batches, techniques=trainer.modifier_objects,
    )


def write_results(trainer: Any, rundir: RunDir, artifact: Any, results: list[FinalResult], steps: int, training_time_ms: float) -> dict[str, Any]:
    """Each final line's rule check in the log, then ``summary.json`` and the challenge's ``submission.json`` (the
    last compliant score)."""
    stack = trainer.stack
    compliance = final_line_compliance(trainer.evaluator, [r.name for r in results])
    for name, check in compliance.items():
        rundir.log(f"compliance:{name} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    compliant_results = [r for r in results if compliance[r.name].ok]
    score = (compliant_results or results)[-1]
    final_name, final_loss, final_bpb = score.name, score.val_loss, score.val_bpb
    if not compliant_results:
        rundir.log("compliance: no final score of this stack satisfies the challenge's rules; submission.json carries the last one")
    summary = {
        "run_id": rundir.run_id,
        "stack": stack.path,
        "seed": stack.run.seed,
        "steps": steps,
        "train_time_ms": training_time_ms,
        "model_params": trainer.n_params,
        "bytes_code": artifact.bytes_code,
        "bytes_model": artifact.bytes_model,
        "nonfinite_skips": trainer.nonfinite_skips,
        "bytes_total": artifact.bytes_total,
        "final": {r.name: {"val_loss": r.val_loss, "val_bpb": r.val_bpb, "compliant": compliance[r.name].ok, "compliance": compliance[r.name].reason} for r in results},
        "score_line": final_name,
        "prequant": {"val_loss": trainer.prequant[0], "val_bpb": trainer.prequant[1]},
        "eval_time_ms": trainer.eval_total_ms,
        "compliant": bool(compliant_results) and all(c.ok for c in quantizer_compliance(trainer.quantizer)),
        "quantizer_compliance": [dataclasses.asdict(c) for c in quantizer_compliance(trainer.quantizer)],
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
            "bytes_code": artifact.bytes_code,
        },
    )
    rundir.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _serialize(weights: dict[str, torch.Tensor]) -> bytes:
    return serialize({k: v.detach().cpu() for k, v in weights.items()})


def _broadcast_bytes(blob: bytes, runtime: Runtime) -> bytes:
    box = [blob]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
