"""Validation loss and val_bpb exactly as the challenge computes them.

val_bpb = (mean token NLL / ln 2) × (tokens / bytes), where a target token's bytes are its SentencePiece
piece length in UTF-8, plus one for a leading-space marker unless the previous token is a boundary
(control/unknown/unused) token. Sequences of ``train_seq_len`` are split contiguously across ranks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError


@attrs.define
class ValData:
    tokens: Tensor
    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor


@attrs.define
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


def token_bytes(prev_ids: Tensor, tgt_ids: Tensor, val: ValData) -> Tensor:
    nbytes = val.base_bytes[tgt_ids].to(dtype=torch.int16)
    nbytes += (val.has_leading_space[tgt_ids] & ~val.is_boundary[prev_ids]).to(dtype=torch.int16)
    return nbytes


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
            byte_count += token_bytes(x.reshape(-1), y.reshape(-1), env.val).to(torch.float64).sum()
    if dist.is_available() and dist.is_initialized():
        for t in (loss_sum, token_count, byte_count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    val_loss = loss_sum / token_count
    bits_per_token = val_loss.item() / math.log(2.0)
    tokens_per_byte = token_count.item() / byte_count.item()
    model.train(was_training)
    return float(val_loss.item()), float(bits_per_token * tokens_per_byte)
