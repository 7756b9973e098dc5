"""Process layout and device policy: one code path for CPU (fp32, gloo, eager) and CUDA (bf16, NCCL, compile).

The dtype and compile policy is a value of its own (``Policy``): a run takes the one its device implies;
``pgolf rehearse`` forces the CUDA policy onto the CPU with a cheap compiler backend, so that the CUDA run's
casts, guards and recompiles happen on a machine without a GPU, through the same code.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import dataclasses
import torch
import torch.distributed as dist

from .config.schema import Stack
from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a run computes: bf16 autocast and the reference's casts, ``torch.compile`` or eager, and the compiler
    backend (None: torch's default, inductor). The device does not decide it when a policy is given."""

    bf16: bool
    compile: bool
    backend: str | None = None


def set_recompile_limit(limit: int) -> None:
    """Dynamo's per-function graph limit (``recompile_limit``; ``cache_size_limit`` before torch 2.6), the knob
    the references raise (PR #1392 to 32 for its final evaluation, PR #1319 to 64)."""
    import torch._dynamo

    config = torch._dynamo.config
    setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", int(limit))


def recompile_limit() -> int:
    import torch._dynamo

    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", None) or config.cache_size_limit)


@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    distributed: bool
    device: torch.device
    bf16: bool
    compile: bool
    grad_accum_steps: int
    compile_backend: str | None = None
    compiled_functions: list[tuple[str, Any, bool]] = dataclasses.field(default_factory=list)
    """(name, code object, fullgraph) of every function ``compiled`` compiled, in order: what ``pgolf rehearse``
    reports on."""
    guard_fail_fn: Any = None
    """Called with each guard failure that leads to a recompile (``pgolf rehearse`` listens); None in a run."""

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> Any:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=True)
        return contextlib.nullcontext()

    def compiled(self, fn: Any, name: str | None = None, **kwargs: Any) -> Any:
        """``fn`` (a module, bound method or function) under ``torch.compile(**kwargs)`` with this run's backend,
        or ``fn`` itself in an eager run. Every compile of a run goes through here, so a rehearsal sees each."""
        if not self.compile:
            return fn
        code = compiled_code(fn)
        self.compiled_functions.append((name or function_name(fn), code, bool(kwargs.get("fullgraph", False))))
        if self.compile_backend is not None:
            kwargs.setdefault("backend", self.compile_backend)
        if self.guard_fail_fn is not None:
            # torch.compile is torch._dynamo.optimize with a backend wrapper and takes no guard-failure hook;
            # optimize does, with the same guards and limits.
            import torch._dynamo

            return torch._dynamo.optimize(
                kwargs.get("backend", "inductor"), nopython=bool(kwargs.get("fullgraph", False)), dynamic=kwargs.get("dynamic"),
                guard_fail_fn=self.guard_fail_fn,
            )(fn)
        return torch.compile(fn, **kwargs)

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def compiled_code(fn: Any) -> Any:
    """The code object dynamo caches graphs on for ``fn``: a module's ``forward``, a method's function."""
    if isinstance(fn, torch.nn.Module):
        fn = type(fn).forward
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__code__", None)


def function_name(fn: Any) -> str:
    """``GPT.forward``, ``GPT.logits``, ``zeropower_batched``: how reports name a compiled function."""
    if isinstance(fn, torch.nn.Module):
        return f"{type(fn).__name__}.forward"
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{fn.__name__}"
    return getattr(fn, "__qualname__", repr(fn))


def setup_runtime(stack: Stack, policy: Policy | None = None) -> Runtime:
    """Read torchrun's environment, pick the device, join the process group, set the math knobs.

    ``policy`` None: the device's own (bf16 and compile on CUDA, ``run.compile`` deciding compile); given, it
    is used as is on whatever device the stack picks (``pgolf rehearse``: the CUDA policy on the CPU)."""
    from .procenv import read_process_env

    layout = read_process_env()  # one line for a stray or garbled RANK/WORLD_SIZE
    distributed, rank, world_size, local_rank = layout.distributed, layout.rank, layout.world_size, layout.local_rank
    base = stack.run.grad_accum_base
    if world_size <= 0 or base % world_size:
        raise ConfigError(
            f"world size {world_size} must divide run.grad_accum_base={base} so every rank runs the same number of micro-batches"
        )
    grad_accum_steps = base // world_size
    d = stack.data
    if d.train_batch_tokens % (world_size * grad_accum_steps * d.train_seq_len):
        raise ConfigError(
            f"data.train_batch_tokens={d.train_batch_tokens} is not divisible by world_size*grad_accum*train_seq_len="
            f"{world_size}*{grad_accum_steps}*{d.train_seq_len}; adjust one of them"
        )
    want = stack.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        from torch.backends.cuda import enable_cudnn_sdp, enable_flash_sdp, enable_math_sdp, enable_mem_efficient_sdp

        enable_cudnn_sdp(False)
        enable_flash_sdp(True)
        enable_mem_efficient_sdp(False)
        enable_math_sdp(False)
    else:
        device = torch.device("cpu")
    if distributed and not dist.is_initialized():
        extra: dict[str, Any] = {"device_id": device} if use_cuda else {}
        store = _attempt_store(rank, world_size)
        if store is not None:
            extra.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **extra)
        dist.barrier()
    if policy is None:
        compile_mode = stack.run.compile
        policy = Policy(bf16=use_cuda, compile=compile_mode == "on" or (compile_mode == "auto" and use_cuda))
    if policy.compile:
        set_recompile_limit(stack.run.recompile_limit)
    return Runtime(
        rank, world_size, local_rank, distributed, device, policy.bf16, policy.compile, grad_accum_steps, compile_backend=policy.backend
    )


def _attempt_store(rank: int, world_size: int) -> Any:
    """Under torchrun, workers share the elastic agent's TCPStore, which outlives a restart: the process group
    of a restarted attempt would read the keys of the failed one (peers' old addresses) and hang. Each attempt
    gets keys of its own under a ``TORCHELASTIC_RESTART_COUNT`` prefix."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=default_pg_timeout
    )
    return dist.PrefixStore(f"pgolf/attempt_{attempt}", client)


def broadcast_str(value: str, runtime: Runtime) -> str:
    """Rank 0's value of a string on every rank (run ids must agree without a launcher)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_object(value: Any, runtime: Runtime) -> Any:
    """Rank 0's value of any picklable object on every rank."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
