"""A tiny model and what runs around it, for tests of techniques: built from a tiny stack with a fixed seed,
a batch, a CPU runtime and an evaluation environment on random tokens.

``tiny_model(registry, extra=...)`` builds a model with your technique in it, in a line::

    model, modifiers, stack = tiny_model(registry, extra='[[modifier]]\\nuse = "my_gate"\\nlayers = "all"')
    host = model.blocks[0].attn          # the attention your modifier installed a module at
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from .stacks import tiny_stack


@attrs.define(frozen=True)
class TableBytes:
    """A byte accounting for tests: bytes per target id from a table (the tokenizer contract's ``ByteCounts``)."""

    per_token: Tensor

    def count(self, prev_ids: Tensor, tgt_ids: Tensor, first_pos: int = 0) -> Tensor:
        return self.per_token[tgt_ids].to(torch.int16)


def tiny_model(registry: Any, *overrides: str, extra: Any = None, seed: int = 0, stack: Any = None) -> tuple[Any, list[Any], Any]:
    """(model, modifier objects, stack): a tiny stack (``tiny_stack(registry, *overrides, extra=extra)`` unless
    ``stack`` is given) built on the CPU after ``torch.manual_seed(seed)``."""
    from pgolf_core.model.gpt import build_model

    stack = stack if stack is not None else tiny_stack(registry, *overrides, extra=extra)
    torch.manual_seed(seed)
    model, modifiers = build_model(stack, registry)
    return model, modifiers, stack


def tiny_batch(stack: Any, seed: int = 0, batch: int = 2) -> tuple[Tensor, Tensor]:
    """Random (inputs, targets) of the stack's vocabulary and training length."""
    gen = torch.Generator().manual_seed(seed + 1)
    vocab, seq = stack.model.vocab_size, stack.data.train_seq_len
    return torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen)


def cpu_runtime() -> Any:
    from pgolf_core.runtime import Runtime

    return Runtime(rank=0, world_size=1, local_rank=0, distributed=False, device=torch.device("cpu"), bf16=False, compile=False, grad_accum_steps=1)


def build_slot(stack: Any, registry: Any, slot: str) -> Any:
    """The object the stack's technique builds for a non-model slot (schedule, quantizer, evaluator, ...)."""
    from pgolf_core.model.spec import BuildContext

    reg = registry.get(slot, stack.technique(slot))
    return reg.technique.build(stack.params(slot), BuildContext(stack.model, stack.run, stack.data))


def tiny_eval_env(stack: Any, seed: int = 0, seq_len: int = 0, model: Any = None) -> Any:
    """An evaluation environment on random validation tokens long enough for windows of ``seq_len`` (default: the
    training length), with random byte counts per token; ``model`` is the uncompiled model evaluators may use."""
    from pgolf_core.evaluate import EvalEnv, ValData

    vocab, seq = stack.model.vocab_size, stack.data.train_seq_len
    longest = max(seq, seq_len)
    gen = torch.Generator().manual_seed(seed + 2)
    tokens = torch.randint(0, vocab, (longest + 1,), generator=gen)
    val = ValData(tokens, TableBytes(torch.randint(1, 4, (vocab,), generator=gen).to(torch.int16)))
    return EvalEnv(val, seq, max(stack.data.val_batch_size, longest), 1, 0, 1, torch.device("cpu"), base_model=model)
