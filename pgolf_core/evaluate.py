"""Validation loss and val_bpb exactly as the challenge computes them.

val_bpb = (mean token NLL / ln 2) × (tokens / bytes); how many bytes each target token stands for is the
``tokenizer`` slot's (``ByteCounts``). Sequences of ``train_seq_len`` are split contiguously across ranks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import dataclasses
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .contracts import ByteCounts
from .errors import ConfigError


@dataclasses.dataclass
class ValData:
    """The validation stream and its byte accounting (from the tokenizer slot)."""

    tokens: Tensor
    bytes: ByteCounts

    def target_bytes(self, prev_ids: Tensor, tgt_ids: Tensor, first_pos: int) -> Tensor:
        """Bytes of each target in ``tgt_ids`` (contiguous validation positions from ``first_pos``)."""
        return self.bytes.count(prev_ids, tgt_ids, first_pos)


@dataclasses.dataclass
class EvalEnv:
    """What an evaluator needs besides the model: the split, the byte tables and the process layout."""

    val: ValData
    seq_len: int
    val_batch_size: int
    grad_accum_steps: int
    rank: int
    world_size: int
    device: torch.device
    autocast: Any = contextlib.nullcontext
    base_model: Any = None  # the uncompiled, unwrapped model (for logits-level evaluators)
    compile: bool = False
    compile_fn: Any = None  # how the run compiles (``Runtime.compiled``); None: plain torch.compile

    def compiled(self, fn: Any) -> Any:
        """``fn`` (e.g. ``base_model.logits``) compiled as the run compiles its model (fullgraph, static shapes, the
        run's backend, counted by ``pgolf rehearse``), or ``fn`` itself in an eager run."""
        if not self.compile:
            return fn
        if self.compile_fn is not None:
            return self.compile_fn(fn, dynamic=False, fullgraph=True)
        return torch.compile(fn, dynamic=False, fullgraph=True)


def eval_val(model: nn.Module, env: EvalEnv) -> tuple[float, float]:
    seq_len = env.seq_len
    local_batch_tokens = env.val_batch_size // (env.world_size * env.grad_accum_steps)
    if local_batch_tokens < seq_len:
        raise ConfigError(
            f"data.val_batch_size={env.val_batch_size} gives less than one sequence per rank "
            f"(world size {env.world_size}, grad accumulation {env.grad_accum_steps}, seq len {seq_len}); raise it"
        )
    local_batch_seqs = local_batch_tokens // seq_len
    tokens = env.val.tokens
    total_seqs = (tokens.numel() - 1) // seq_len
    seq_start = (total_seqs * env.rank) // env.world_size
    seq_end = (total_seqs * (env.rank + 1)) // env.world_size
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    token_count = torch.zeros((), device=env.device, dtype=torch.float64)
    byte_count = torch.zeros((), device=env.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    # no_grad rather than the reference's inference_mode: same numbers, but tensors cached during eval
    # (RoPE tables) stay usable by training afterwards, also when a run has no warmup steps.
    with torch.no_grad():
        for batch_start in range(seq_start, seq_end, local_batch_seqs):
            batch_end = min(batch_start + local_batch_seqs, seq_end)
            local = tokens[batch_start * seq_len : batch_end * seq_len + 1].to(device=env.device, dtype=torch.int64, non_blocking=True)
            x = local[:-1].reshape(-1, seq_len)
            y = local[1:].reshape(-1, seq_len)
            with env.autocast():
                batch_loss = model(x, y).detach()
            n = float(y.numel())
            loss_sum += batch_loss.to(torch.float64) * n
            token_count += n
            byte_count += env.val.target_bytes(x.reshape(-1), y.reshape(-1), batch_start * seq_len + 1).to(torch.float64).sum()
    if dist.is_available() and dist.is_initialized():
        for t in (loss_sum, token_count, byte_count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    val_loss = loss_sum / token_count
    bits_per_token = val_loss.item() / math.log(2.0)
    tokens_per_byte = token_count.item() / byte_count.item()
    model.train(was_training)
    return float(val_loss.item()), float(bits_per_token * tokens_per_byte)
