"""Process layout and device policy: one code path for CPU (fp32, gloo, eager) and CUDA (bf16, NCCL, compile)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import dataclasses
import torch
import torch.distributed as dist

from .config.schema import Stack
from .errors import ConfigError


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

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(stack: Stack) -> Runtime:
    """Read torchrun's environment, pick the device, join the process group, set the math knobs."""
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
    compile_mode = stack.run.compile
    compile_on = compile_mode == "on" or (compile_mode == "auto" and use_cuda)
    return Runtime(rank, world_size, local_rank, distributed, device, use_cuda, compile_on, grad_accum_steps)


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
