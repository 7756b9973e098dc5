"""The training step's host syncs and collectives are the reference's: pgolf's loop (``Trainer.train``) and the
official ``train_gpt.py``'s loop, transcribed below around the same model, optimizers and loader, run side by
side on two gloo processes, and each step's counts must be equal.

Counted per step (from one ``on_step_start`` to the next, validation excluded): host reads (``item``,
``tolist``, ``bool``/``float``/``int`` of a tensor, ``numpy``, ``cpu``: each a device-to-host sync on CUDA;
seen through a ``TorchFunctionMode``), device synchronisations (``Runtime.sync``) and collectives (every
``c10d`` op the dispatcher runs, seen through a ``TorchDispatchMode``: DDP's gradient all-reduce, Muon's update
all-reduce, the wallclock-cap flag). The run has the record's wallclock cap, so the reference's per-step all-reduce of the cap flag is there,
and logs the first 10 steps and every 6th, so both kinds of step are counted. ``run.on_nonfinite = "skip"``
drops a bad update exactly and pays a host read and an all-reduce per step for it: the counts show that too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FIXTURE_1024, tiny_stack

ITERATIONS = 12
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"}


class _Counter(TorchFunctionMode):
    """Host reads as they happen, between the step marks."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.events.append(("read", name))
        return func(*args, **(kwargs or {}))

    def mark(self, what: str, step: int | None = None) -> None:
        self.events.append(("mark", (what, step)))


class _Collectives(TorchDispatchMode):
    """Collectives as the dispatcher runs them (also those DDP's reducer launches from C++), into the same events."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.counter.events.append(("collective", str(func)))
        return func(*args, **(kwargs or {}))


def _per_step(counter: _Counter) -> list[dict[str, int]]:
    """Counts for each training step: the events from its mark to the next mark of any kind."""
    steps: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for kind, value in counter.events:
        if kind == "mark":
            what, _ = value
            current = {"reads": 0, "syncs": 0, "collectives": 0} if what == "step" else None
            if current is not None:
                steps.append(current)
        elif current is not None:
            current[{"read": "reads", "sync": "syncs", "collective": "collectives"}[kind]] += 1
    return steps


def _reference_loop(trainer, counter: _Counter) -> None:
    """The official train_gpt.py's main loop (validation, lr schedule, micro-batches, clip and optimizer steps,
    ``train_loss.item()`` in the log line, the cap flag's all-reduce), around pgolf's model, optimizers and loader."""
    args, rt, model, opt = trainer.stack.run, trainer.runtime, trainer.model, trainer.optimizers
    data, grad_accum = trainer.stack.data, rt.grad_accum_steps
    max_wallclock_ms = 1000.0 * args.max_wallclock_seconds if args.max_wallclock_seconds > 0 else None
    training_time_ms, stop_after_step, step = 0.0, None, 0
    rt.sync()
    t0 = time.perf_counter()
    while True:
        last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
        if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            rt.sync()
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            counter.mark("eval")  # where pgolf's loop fires on_eval_start
            from pgolf_core.evaluate import eval_val

            eval_val(model, trainer.eval_env)
            rt.sync()
            t0 = time.perf_counter()
        if last_step:
            break
        counter.mark("step", step)
        elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        scale = trainer.schedule.lr_mul(step, elapsed_ms)
        opt.zero_grad()
        train_loss = torch.zeros((), device=rt.device)
        for micro_step in range(grad_accum):
            if trainer.ddp:
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            batch = trainer.loader.next_batch(data.train_batch_tokens, data.train_seq_len, grad_accum)
            with rt.autocast():
                loss = model(batch.inputs, batch.targets)
            train_loss += loss.detach()
            (loss * (1.0 / grad_accum)).backward()
        train_loss /= grad_accum
        opt.before_step(step)  # the momentum warm-up
        opt.set_lr_scale(scale)
        opt.step(trainer.base_model)  # clip_grad_norm_, then each optimizer's step
        opt.zero_grad()
        step += 1
        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or stop_after_step is not None):
            f"step:{step}/{args.iterations} train_loss:{train_loss.item():.4f} train_time:{approx_ms:.0f}ms"
        reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
        if rt.distributed and max_wallclock_ms is not None:
            reached_cap_tensor = torch.tensor(int(reached_cap), device=rt.device)
            dist.all_reduce(reached_cap_tensor, op=dist.ReduceOp.MAX)
            reached_cap = bool(reached_cap_tensor.item())
        if stop_after_step is None and reached_cap:
            stop_after_step = step
    counter.mark("end")


def _count(trainer, run) -> list[dict[str, int]]:
    counter = _Counter()
    real_sync = trainer.runtime.sync

    def sync() -> None:
        counter.events.append(("sync", None))
        real_sync()

    trainer.runtime.sync = sync
    with counter, _Collectives(counter):
        run(counter)
    trainer.runtime.sync = real_sync
    return _per_step(counter)


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pgolf_core.hookspecs import hookimpl
    from pgolf_core.registry import default_registry
    from pgolf_core.runtime import setup_runtime
    from pgolf_core.train import Trainer, load_data

    registry = default_registry()

    def tiny(on_nonfinite: str):
        return tiny_stack(
            registry, "model.num_layers=2", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1", "data.train_seq_len=32",
            "data.train_batch_tokens=256", "data.val_batch_size=512", f'data.path="{data}"', "run.grad_accum_base=2",
            f"run.iterations={ITERATIONS}", "run.train_log_every=6", "run.max_wallclock_seconds=100000.0", f'run.on_nonfinite="{on_nonfinite}"',
        )

    stack = tiny("stop")
    runtime = setup_runtime(stack)
    try:
        files = load_data(stack, runtime.device, registry)

        def trainer(on_nonfinite: str = "stop"):
            return Trainer(tiny(on_nonfinite), registry, runtime, files, lambda *a, **k: None, lambda **k: None)

        class Marks:
            def __init__(self, counter):
                self.counter = counter

            @hookimpl
            def pgolf_on_step_start(self, state):
                self.counter.mark("step", state.step)

            @hookimpl
            def pgolf_on_eval_start(self, state):
                self.counter.mark("eval")

            @hookimpl
            def pgolf_on_train_end(self, state):
                self.counter.mark("end")

        def pgolf_loop(ours):
            def run(counter):
                marks = Marks(counter)
                registry.pm.register(marks)
                try:
                    ours.train()
                finally:
                    registry.pm.unregister(marks)

            return run

        ours, skipping, theirs = trainer(), trainer("skip"), trainer()
        result = {"pgolf": _count(ours, pgolf_loop(ours)), "pgolf_skip": _count(skipping, pgolf_loop(skipping))}
        result["reference"] = _count(theirs, lambda counter: _reference_loop(theirs, counter))
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        runtime.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict:
    """Per-step counts of pgolf's loop (``run.on_nonfinite`` "stop" and "skip") and the reference's, on 2 gloo processes."""
    from pgolf_core.bench import make_val_slice

    tmp = tmp_path_factory.mktemp("hot_path")
    data = make_val_slice(str(FIXTURE_1024), 1025, tmp / "data")
    out = tmp / "counts.json"
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_a_training_step_has_the_references_host_syncs_and_collectives(counts):
    ours, ref = counts["pgolf"], counts["reference"]
    assert len(ours) == len(ref) == ITERATIONS
    assert ours == ref
    logged = [s for s in range(1, ITERATIONS + 1) if s <= 10 or s % 6 == 0]
    # The reference's own: the logged loss and the cap flag on logged steps, the cap flag alone on the others;
    # DDP's gradient all-reduce (one bucket; in the second step DDP also agrees on its rebuilt buckets), Muon's
    # update all-reduce and the cap flag's.
    assert [s["reads"] for s in ref] == [2 if s in logged else 1 for s in range(1, ITERATIONS + 1)]
    # The last step's window ends where the final validation starts, after its device synchronisation.
    assert [s["syncs"] for s in ref] == [0] * (ITERATIONS - 1) + [1] and min(s["collectives"] for s in ref) == 3, ref


def test_dropping_a_nonfinite_update_exactly_costs_a_read_and_an_all_reduce_per_step(counts):
    ours, ref = counts["pgolf_skip"], counts["reference"]
    assert [s["reads"] - r["reads"] for s, r in zip(ours, ref)] == [1] * ITERATIONS
    assert [s["collectives"] - r["collectives"] for s, r in zip(ours, ref)] == [1] * ITERATIONS
