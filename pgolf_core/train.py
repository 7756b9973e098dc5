"""The pipeline: data → model build → train (wallclock cap), then ``pgolf_core.finalize``: average → quantize →
compress → size accounting → round trip → evaluate → report.

The loop follows the official ``train_gpt.py`` step for step (same data order, same warmup-and-restore,
same schedule evaluation points, same log lines), so that a stack reproduces its reference's losses.
Techniques are reached only at build time and at loop boundaries.
"""

from __future__ import annotations

import copy
import math
import platform
import random
import time
import warnings
from pathlib import Path
from typing import Any

import dataclasses
import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__
from .config.dump import stack_to_toml
from .config.schema import Stack
from .contracts import LOOP_EVENTS, BudgetAware, Stateful, loop_handlers, train_budget_ms, train_time_reserve
from .finalize import export_and_evaluate, write_results
from .data import TRAIN_PATTERN, VAL_PATTERN, load_shard, load_validation_tokens, read_shard_header, shard_files
from .errors import NonFiniteError, PgolfError

from .evaluate import EvalEnv, ValData, eval_val
from .model.gpt import build_model, count_parameters
from .model.layers import cast_for_device
from .model.roles import is_frozen
from .model.spec import BuildContext
from .registry import Registry
from .rundir import RunDir
from .runtime import Runtime
from .sample import build_sample, is_sample, tokenizer_path


@dataclasses.dataclass
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
    elapsed_ms: float = 0.0
    """At ``on_step_start``: the training time (ms) measured right before the step, what the schedule's
    ``lr_mul`` received (for switches that fire at a fraction of training time)."""
    train_loss: float | None = None
    last_val: tuple[float, float] | None = None


@dataclasses.dataclass
class LoopState:
    """Where the main loop is: the part of a checkpoint that is not a tensor."""

    step: int = 0
    training_time_ms: float = 0.0
    stop_after_step: int | None = None


class Interrupted(PgolfError):
    """A signal stopped the run after a completed (and checkpointed) step."""

    exit_code = 130

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by a signal after step {step}; the checkpoint was saved, continue with --resume RUN_DIR")
        self.step = step


class Events:
    """Loop events, delivered in stack order to the built technique objects, then to pluggy observers."""

    NAMES = LOOP_EVENTS

    def __init__(self, objects: list[Any], hooks: Any = None) -> None:
        self.handlers = {n: loop_handlers(objects, n) for n in self.NAMES}
        self.hooks = hooks  # the plugin manager's hook relay; None where no plugins observe (an exported script)

    def fire(self, name: str, state: TrainState) -> None:
        for handler in self.handlers[name]:
            handler(state)
        if self.hooks is not None:
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


@dataclasses.dataclass
class DataFiles:
    """Everything read from disk before a run starts, so bad data fails before anything is written."""

    data_path: str
    tokenizer_path: str
    train_files: list[Path]
    val: ValData


def load_data(stack: Stack, device: torch.device, registry: Registry) -> DataFiles:
    """``load_data_files`` on the stack's paths, the bundled sample's built on first use; a tokenizer file that
    is not there says how to get it, or how to run offline on the sample."""
    data_path, tok_path = resolve_data_paths(stack)
    if not is_sample(stack.data.tokenizer) and not Path(tok_path).is_file():
        from .errors import DataError
        from .sample import for_vocab

        vocab_size = stack.model.vocab_size
        sample = for_vocab(vocab_size)
        offline = f"; or run offline at toy size on the built-in sample (--toy, or data.tokenizer = '{sample}')" if sample else ""
        raise DataError(
            f"data.tokenizer {tok_path}: file not found; set data.tokenizer (or TOKENIZER_PATH with --legacy-env), or download it "
            f"with the shards (pgolf data download --variant sp{vocab_size}, needs the network){offline}"
        )
    return load_data_files(stack, device, registry, data_path, tok_path)


def load_data_files(stack: Stack, device: torch.device, registry: Registry, data_path: str, tok_path: str) -> DataFiles:
    vocab = stack.model.vocab_size
    tokenizer = build_slot(stack, registry, "tokenizer")
    tokenizer.load(tok_path, vocab)
    train_files = shard_files(data_path, TRAIN_PATTERN, "training")
    for f in train_files:
        read_shard_header(f)
    load_shard(train_files[0], vocab)  # token ids of the shard training starts with (later ones: when reached)
    val_files = shard_files(data_path, VAL_PATTERN, "validation")
    # Like the references, the split is trimmed to whole sequences of the longest length evaluated.
    eval_seq_len = build_slot(stack, registry, "evaluator").eval_seq_len
    val_tokens = load_validation_tokens(val_files, max(stack.data.train_seq_len, eval_seq_len), vocab)
    tokenizer.check_shards(val_tokens, data_path)
    return DataFiles(data_path, tok_path, train_files, ValData(val_tokens, tokenizer.byte_counts(val_tokens, device)))


class Trainer:
    """One training run, from built parts to the exported, round-tripped, evaluated artifact.

    The pieces are methods so that other drivers reuse them unchanged: ``pgolf bench`` times ``train_step``,
    checkpointing reads and restores ``state_dict``. ``run`` is the reference's sequence.
    """

    nonfinite_skips = 0  # steps whose update was dropped under run.on_nonfinite = "skip"

    def __init__(self, stack: Stack, registry: Registry, runtime: Runtime, data_files: DataFiles, log: Any, metric: Any) -> None:
        self.stack, self.registry, self.runtime, self.data_files = stack, registry, runtime, data_files
        self.log, self.metric = log, metric
        args, data = stack.run, stack.data
        seed_everything(args.seed)
        device = runtime.device
        self.base_model, modifier_objects = build_model(stack, registry)
        self.base_model = self.base_model.to(device)
        cast_for_device(self.base_model, runtime.bf16)
        compiled = runtime.compiled(self.base_model, dynamic=False, fullgraph=True)
        self.optimizers = build_slot(stack, registry, "optimizer")(self.base_model, runtime)
        self.ddp = runtime.distributed and not self.optimizers.syncs_gradients
        if self.ddp:
            with warnings.catch_warnings():  # the reference's broadcast_buffers=False, kept for identical behaviour
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                device_ids = [runtime.local_rank] if runtime.is_cuda else None
                untrained = [n for n, p in self.base_model.named_parameters() if is_frozen(p)]
                if untrained:  # in no optimizer and possibly unused for a while: DDP must not wait for their gradients
                    DDP._set_params_and_buffers_to_ignore_for_model(compiled, [f"_orig_mod.{n}" if compiled is not self.base_model else n for n in untrained])
                self.model: nn.Module = DDP(compiled, device_ids=device_ids, broadcast_buffers=False)
        else:
            self.model = compiled
        self.schedule = build_slot(stack, registry, "schedule")
        self.averaging = build_slot(stack, registry, "averaging")
        self.quantizer = build_slot(stack, registry, "quantizer")
        self.compressor = build_slot(stack, registry, "compressor")
        self.evaluator = build_slot(stack, registry, "evaluator")
        self.loader_factory = build_slot(stack, registry, "loader")
        self.modifier_objects = modifier_objects
        self.eval_env = EvalEnv(
            data_files.val, data.train_seq_len, data.val_batch_size, runtime.grad_accum_steps, runtime.rank,
            runtime.world_size, device, runtime.autocast, base_model=self.base_model, compile=runtime.compile, compile_fn=runtime.compiled,
        )
        self.loader = self.new_loader()
        self.state = TrainState(stack, runtime, self.base_model, self.optimizers, log, iterations=args.iterations)
        objects = [self.schedule, self.averaging, self.quantizer, self.compressor, self.evaluator, *modifier_objects]
        # Post-training work that must count as training time (calibration on training data) shortens the loop.
        self.reserve_s = train_time_reserve(objects)
        self.budget_ms = train_budget_ms(args.max_wallclock_seconds, self.reserve_s)
        for obj in objects:
            if isinstance(obj, BudgetAware):
                obj.set_train_budget(self.budget_ms)
        self.events = Events(objects, registry.hooks)
        self.stateful = [o for o in objects if isinstance(o, Stateful)]
        self.n_params = count_parameters(self.base_model)
        self.loop = LoopState()
        self._resumed_objects: list[Any] | None = None
        self.checkpoint_every = 0
        self.checkpoint_fn: Any = None  # called with the step after a step that is a multiple of checkpoint_every
        self.last_checkpoint: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
        self.watch = NonFiniteWatch(self.base_model, device)
        self.stop_requested: Any = lambda: False  # a signal asked us to stop after this step

    def new_loader(self) -> Any:
        rt = self.runtime
        return self.loader_factory(self.data_files.train_files, rt.rank, rt.world_size, rt.device, self.stack.model.vocab_size)

    # -- steps ------------------------------------------------------------------------------------------
    def forward_backward(self) -> torch.Tensor:
        """Accumulate gradients over this rank's micro-batches; returns the mean micro-batch loss."""
        rt, data = self.runtime, self.stack.data
        grad_accum = rt.grad_accum_steps
        total = torch.zeros((), device=rt.device)
        for micro_step in range(grad_accum):
            if self.ddp:
                self.model.require_backward_grad_sync = micro_step == grad_accum - 1
            batch = self.loader.next_batch(data.train_batch_tokens, data.train_seq_len, grad_accum)
            with rt.autocast():
                loss = self.model(batch.inputs, batch.targets, batch.aux) if batch.aux else self.model(batch.inputs, batch.targets)
            total += loss.detach()
            (loss * (1.0 / grad_accum)).backward()
        total /= grad_accum  # in place, as the reference's train_loss /= grad_accum_steps
        return total

    def train_step(self, step: int, scale: float) -> torch.Tensor:
        self.optimizers.zero_grad()
        loss = self.forward_backward()
        if self.stack.run.on_nonfinite == "skip":
            grad_norm = self.nonfinite_probe(loss)
            if grad_norm is not None:  # NaN/inf: never applied to the weights
                self.skip_nonfinite(step, loss, grad_norm)
                self.optimizers.zero_grad()
                return loss
        else:
            self.watch.record(step, loss)  # on the device; read at the loop's next host read (check_finite)
        self.optimizers.before_step(step)
        self.optimizers.set_lr_scale(scale)
        self.optimizers.step(self.base_model)
        self.optimizers.zero_grad()
        return loss

    def nonfinite_probe(self, loss: torch.Tensor) -> torch.Tensor | None:
        """``run.on_nonfinite = "skip"`` only: one fused check of the step's loss and gradients before the update;
        None when all are finite.

        Dropping exactly the bad update needs its answer on the host before the optimizer runs: one pass
        reading the gradients (a multi-tensor norm), a 2-element all-reduce under torchrun (ranks must agree:
        gradients are not synchronised yet with some optimizers), and one host sync per step, none of which the
        references have; the default, "stop", adds neither (``NonFiniteWatch``). See docs/reliability.md.
        """
        grads = [p.grad for p in self.base_model.parameters() if p.grad is not None]
        grad_norm = _total_norm(grads) if grads else torch.zeros((), device=loss.device)
        probe = torch.stack([loss.detach().float().reshape(()), grad_norm.float().reshape(())])
        if self.runtime.distributed:
            torch.distributed.all_reduce(probe)  # NaN/inf on any rank reaches every rank
        if bool(torch.isfinite(probe).all()):
            return None
        return grad_norm

    def skip_nonfinite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """``run.on_nonfinite = "skip"``: log and count the dropped step."""
        args = self.stack.run
        n = step + 1
        values = f"train_loss:{float(loss):.4f} grad_norm:{float(grad_norm):.4f}"
        self.metric(kind="nonfinite", step=n, train_loss=float(loss), grad_norm=float(grad_norm), action="skip")
        self.nonfinite_skips += 1
        self.log(f"step:{n}/{args.iterations} nonfinite {values}: update skipped (run.on_nonfinite=skip; {self.nonfinite_skips} so far)")

    def check_finite(self, step: int, loss: torch.Tensor | None = None, agreed_first: float | None = None) -> float | None:
        """``run.on_nonfinite = "stop"``, at a host read the loop makes anyway (after ``step`` steps): raise one line
        naming the first non-finite step, what was found and the last checkpoint when the training went
        non-finite; else return ``loss`` as a float (the value the loop was about to read). ``agreed_first``: the
        first non-finite step every rank agreed on through the wallclock-cap all-reduce."""
        if self.stack.run.on_nonfinite != "stop":
            return None if loss is None else loss.item()
        found = self.watch.check(loss, distributed=self.runtime.distributed)
        if agreed_first is not None and found.first_bad is None:
            found = dataclasses.replace(found, first_bad=agreed_first)
        if found.ok and agreed_first is None:
            self.watch.checked_at = step
            return found.loss
        args = self.stack.run
        first = found.first_bad
        if first is not None:
            at = int(first) + 1
            detail = f"train loss non-finite from step {at}" + ("" if found.weights_ok else ", weights non-finite")
        else:
            at = step
            detail = f"weights non-finite, train loss finite: a non-finite gradient after step {self.watch.checked_at}"
        if at != step:
            detail += f"; found at step {step}"
        if found.loss is not None:
            detail = f"train_loss:{found.loss:.4f}; {detail}"
        self.metric(kind="nonfinite", step=at, found_at=step, train_loss=found.loss, weights_finite=found.weights_ok, action="stop")
        if self.checkpoint_fn is None:
            saved = ""
        elif self.last_checkpoint is None:
            saved = "; no checkpoint was written before it"
        else:
            saved = (
                f"; the last checkpoint (step {self.last_checkpoint}) holds the last state checked finite: --resume RUN_DIR "
                "[--force] continues from there"
            )
        raise NonFiniteError(
            f"non-finite loss or gradients at step {at}/{args.iterations} ({detail}); techniques: {technique_table(self.stack)}"
            f"{saved}; lower the learning rates, or set run.on_nonfinite = \"skip\" to drop such steps"
        )

    def save_checkpoint(self, step: int) -> None:
        """A checkpoint of the state after ``step`` steps, checked finite first (its copy to the host waits for the
        device anyway), so that every checkpoint is a state a resumed run can continue from."""
        self.check_finite(step)
        self.checkpoint_fn(step)
        self.last_checkpoint = step

    def warmup(self, steps: int) -> None:
        """Prime compiled paths, then restore the initial weights, optimizer state and data stream."""
        if steps <= 0:
            return
        initial_model = {k: v.detach().cpu().clone() for k, v in self.base_model.state_dict().items()}
        initial_opt = copy.deepcopy(self.optimizers.state_dict())
        self.model.train()
        for warmup_step in range(steps):
            self.optimizers.zero_grad()
            self.forward_backward()
            self.optimizers.step(self.base_model)
            self.optimizers.zero_grad()
            if steps <= 20 or (warmup_step + 1) % 10 == 0 or warmup_step + 1 == steps:
                self.log(f"warmup_step:{warmup_step + 1}/{steps}")
        self.base_model.load_state_dict(initial_model, strict=True)
        self.optimizers.load_state_dict(initial_opt)
        self.optimizers.zero_grad()
        if self.ddp:
            self.model.require_backward_grad_sync = True
        self.loader = self.new_loader()

    # -- checkpoint state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue as the same run, for this rank."""
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.runtime.is_cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        return {
            "model": self.base_model.state_dict(),
            "optimizers": self.optimizers.state_dict(),
            "loader": self.loader.state_dict(),
            "objects": [o.state_dict() for o in self.stateful],
            "loop": dataclasses.asdict(self.loop),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_model.load_state_dict(state["model"], strict=True)
        self.optimizers.load_state_dict(state["optimizers"])
        self.loader.load_state_dict(state["loader"])
        self.loop = LoopState(**state["loop"])
        self.last_checkpoint = self.watch.checked_at = self.loop.step  # a checkpoint holds a state checked finite
        # Technique state is applied after on_train_start, which would otherwise re-initialise it (EMA).
        self._resumed_objects = state["objects"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and self.runtime.is_cuda:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.runtime.device)

    # -- the run ----------------------------------------------------------------------------------------
    def log_header(self) -> None:
        log, data, args = self.log, self.stack.data, self.stack.run
        df, rt, m = self.data_files, self.runtime, self.stack.model
        log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={df.tokenizer_path}")
        log(f"train_loader:dataset:{Path(df.data_path).name} train_shards:{len(df.train_files)}")
        log(f"val_loader:shards pattern={df.data_path}/{VAL_PATTERN} tokens:{df.val.tokens.numel() - 1}")
        log(f"model_params:{self.n_params}")
        log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps}")
        log(f"device:{rt.device.type} dtype:{'bf16' if rt.bf16 else 'fp32'} compile:{rt.compile}")
        log(f"attention_mode:{self.stack.technique('attention')} num_heads:{m.num_heads} num_kv_heads:{m.num_kv_heads}")
        log(
            f"train_batch_tokens:{data.train_batch_tokens} train_seq_len:{data.train_seq_len} "
            f"iterations:{args.iterations} warmup_steps:{args.warmup_steps} max_wallclock_seconds:{args.max_wallclock_seconds:.3f}"
        )
        log(f"seed:{args.seed}")

    def train(self) -> tuple[int, float]:
        """The main loop (wallclock cap, periodic validation, events); returns (steps, training ms)."""
        args, rt, log, state, events = self.stack.run, self.runtime, self.log, self.state, self.events
        max_wallclock_ms = self.budget_ms
        if max_wallclock_ms is not None and self.reserve_s > 0:
            log(f"clock:reserving {self.reserve_s:.0f}s of the training clock for post-training work, effective={max_wallclock_ms:.0f}ms")
        loop = self.loop
        stop_after_step, training_time_ms, step = loop.stop_after_step, loop.training_time_ms, loop.step
        events.fire("on_train_start", state)
        if self._resumed_objects is not None:
            for obj, obj_state in zip(self.stateful, self._resumed_objects, strict=True):
                obj.load_state_dict(obj_state)
            self._resumed_objects = None
            log(f"resumed at step:{step}/{args.iterations} train_time:{training_time_ms:.0f}ms")
        rt.sync()
        t0 = time.perf_counter()
        while True:
            last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
            if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
                rt.sync()
                training_time_ms += 1000.0 * (time.perf_counter() - t0)
                state.step, state.train_time_ms = step, training_time_ms
                events.fire("on_eval_start", state)
                val_loss, val_bpb = eval_val(self.model, self.eval_env)
                state.last_val = (val_loss, val_bpb)
                events.fire("on_eval_end", state)
                log(
                    f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms"
                )
                self.metric(kind="val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=training_time_ms)
                rt.sync()
                t0 = time.perf_counter()
            if last_step:
                if stop_after_step is not None and step < args.iterations:
                    log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{args.iterations}")
                break

            elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
            scale = self.schedule.lr_mul(step, elapsed_ms)
            state.step, state.lr_scale, state.elapsed_ms = step, scale, elapsed_ms
            events.fire("on_step_start", state)
            train_loss = self.train_step(step, scale)
            step += 1
            approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
            state.step, state.lr_scale, state.train_time_ms = step, scale, approx_ms
            events.fire("after_optimizer_step", state)
            if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or stop_after_step is not None):
                loss_value = self.check_finite(step, train_loss)  # the reference's train_loss.item(), with the check
                state.train_loss = loss_value
                log(f"step:{step}/{args.iterations} train_loss:{loss_value:.4f} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms")
                self.metric(kind="train", step=step, train_loss=loss_value, train_time_ms=approx_ms, lr_scale=scale)
            events.fire("on_step_end", state)
            reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
            if rt.distributed and max_wallclock_ms is not None:
                # The reference's per-step all-reduce of the cap flag; its second element carries the first
                # non-finite step (negated: MAX over ranks is the earliest), so every rank stops at once.
                flags = self.watch.with_flag(float(reached_cap)) if args.on_nonfinite == "stop" else torch.tensor(float(reached_cap), device=rt.device)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                values = flags.tolist() if flags.ndim else [flags.item()]
                reached_cap = values[0] > 0
                if len(values) > 1 and math.isfinite(values[1]):
                    self.check_finite(step, agreed_first=-values[1])
            if stop_after_step is None and reached_cap:
                stop_after_step = step
            stop_now = self.stop_requested()
            if self.checkpoint_fn is not None and ((self.checkpoint_every and step % self.checkpoint_every == 0) or stop_now):
                self.loop = LoopState(step=step, training_time_ms=approx_ms, stop_after_step=stop_after_step)
                self.save_checkpoint(step)
            if stop_now:
                raise Interrupted(step)
        self.check_finite(step)  # after the last validation's reads: nothing non-finite is averaged, quantized or exported
        events.fire("on_train_end", state)
        if rt.is_cuda:
            log(
                f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 1024 // 1024} MiB"
            )
        return step, training_time_ms


@dataclasses.dataclass(frozen=True)
class Finiteness:
    loss: float | None  # the train loss the loop read with the check (None when it read none)
    first_bad: float | None  # the first step (0-based) whose train loss was non-finite on this rank, if any
    weights_ok: bool

    @property
    def ok(self) -> bool:
        return self.weights_ok and self.first_bad is None


class NonFiniteWatch:
    """Non-finite detection that adds no host sync and no collective to a training step (``run.on_nonfinite =
    "stop"``, the default).

    Per step, on the device (``record``): the first step whose train loss was NaN/inf, three scalar kernels and
    nothing read back. At the host reads the loop makes anyway (``check``, through ``Trainer.check_finite``): the
    weights' finiteness (one multi-tensor pass over the parameters) and that step, read back in one transfer
    with the value the loop was reading: the logged train loss (the reference's ``train_loss.item()``), the
    start of a checkpoint, the end of training. Under torchrun with a wallclock cap the per-step all-reduce of
    the cap flag also carries the first non-finite step (``with_flag``). After a synchronised update every rank
    holds the same weights, so ranks decide alike without a collective of their own.

    Detection latency: a non-finite step is found at the next of these points: the same step under torchrun
    with a wallclock cap; otherwise the next logged step (each of the first 10, then every
    ``run.train_log_every``), the next checkpoint (checked before it is written, so every checkpoint holds a
    finite state) or the end of training (after the last validation, before averaging, quantizing or the final
    evaluation), whichever comes first.
    Its update has been applied by then; dropping exactly that update needs a host read before every optimizer
    step, which ``run.on_nonfinite = "skip"`` pays for.
    """

    NEVER = float("inf")

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.first_bad = torch.full((), self.NEVER, dtype=torch.float64, device=device)
        self.checked_at = 0  # the last step the check found finite

    def record(self, step: int, loss: torch.Tensor) -> None:
        bad_at = torch.where(torch.isfinite(loss.detach()), self.NEVER, float(step))
        self.first_bad = torch.minimum(self.first_bad, bad_at)

    def with_flag(self, flag: float) -> torch.Tensor:
        """``[flag, -first_bad]``: what the wallclock-cap all-reduce (MAX) carries."""
        return torch.stack([torch.full_like(self.first_bad, flag), -self.first_bad])

    def check(self, loss: torch.Tensor | None, distributed: bool) -> Finiteness:
        params = [p for p in self.model.parameters()]
        weights_ok = torch.isfinite(_total_norm(params)) if params else torch.ones((), dtype=torch.bool, device=self.first_bad.device)
        parts = [self.first_bad, weights_ok.to(torch.float64)] + ([loss.detach().to(torch.float64).reshape(())] if loss is not None else [])
        values = torch.stack(parts).tolist()  # one host read, where the loop reads anyway
        first = values[0] if math.isfinite(values[0]) else None
        if distributed and values[1] > 0:
            first = None  # ranks agree on the weights, not on each one's own loss: act on the weights alone
        return Finiteness(values[2] if loss is not None else None, first, values[1] > 0)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: grouped multi-tensor kernels
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0, foreach=None)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).float() for g in grads]))


def technique_table(stack: Stack) -> str:
    """``embedding=token attention=gqa ... modifier[0]=xsa@'last 4'``: the recipe in one line."""
    parts = [f"{slot}={choice.technique}" for slot, choice in stack.slots.items()]
    parts += [f"modifier[{i}]={mod.technique}@{mod.layers!r}" for i, mod in enumerate(stack.modifiers)]
    return " ".join(parts)


def log_provenance(stack: Stack, log: Any, resolved_toml: str) -> None:
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


def run_training(
    stack: Stack,
    registry: Registry,
    runtime: Runtime,
    rundir: RunDir,
    data_files: DataFiles,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_requested: Any = None,
) -> dict[str, Any]:
    from . import checkpoint
    from .export import code_bytes
    from .runtime import broadcast_object

    resolved_toml = stack_to_toml(stack)
    # The code the challenge counts: the packed train_gpt.py `pgolf export` writes for this stack, known before
    # training so that the cap check and any pruning target use it.
    bytes_code = broadcast_object(code_bytes(stack, registry) if runtime.is_master else None, runtime)
    if not resume:
        rundir.write_text("stack.toml", resolved_toml)
        log_provenance(stack, rundir.log, resolved_toml)
        rundir.log(f"code_bytes:{bytes_code} (the packed train_gpt.py of 'pgolf export')")
    trainer = Trainer(stack, registry, runtime, data_files, rundir.log, rundir.metric)
    trainer.log_header()
    latest = checkpoint.latest(rundir.path) if resume else None
    if latest is not None:
        trainer.load_state_dict(checkpoint.load(latest, runtime))
    else:
        if resume:
            rundir.log("resume: no complete checkpoint in the run directory; starting from step 0")
        trainer.warmup(stack.run.warmup_steps)
    if checkpoint_every or stop_requested is not None:
        trainer.checkpoint_every = checkpoint_every
        trainer.checkpoint_fn = lambda step: checkpoint.save(rundir.path, step, trainer.state_dict(), runtime)
    if stop_requested is not None:
        trainer.stop_requested = stop_requested
    steps, training_time_ms = trainer.train()
    artifact, results = export_and_evaluate(trainer, rundir, bytes_code)
    return write_results(trainer, rundir, artifact, results, steps, training_time_ms)
