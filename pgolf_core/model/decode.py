"""Incremental decoding (a KV cache) for sampling from the model, one new position per forward.

Why: GPTQ's self-generated calibration (PR #1019 and its descendants) samples thousands of tokens per
sequence, and a full forward over the prefix for every new token costs O(T²) projections and MLPs; the
reference runs spent minutes there. With a cache each step computes the new position only.

The numbers are the full forward's at the last position, not an approximation, as long as the prefix is
no longer than ``exact_positions(model)``: only floating-point summation order differs. Past that, NTK-aware
RoPE (whose base depends on the sequence length once it passes ``ntk_seq_len``) makes every earlier position's
hidden state depend on the current length, so no cache can be exact: attention keeps its keys *before* RoPE
and rotates them with the current tables, which makes layer 0 exact, but deeper layers see the keys and
values of earlier lengths. Callers either switch to full forwards there or accept that approximation.

Protocol, for module authors: a module that mixes positions sets the class attribute ``mixes_positions =
True``. If it can run incrementally it also sets ``decode_aware = True`` and, while ``self._decode`` is a
``DecodeCache``, reads and updates ``self._decode.state(self)`` (a dict, one per call of the module in a
step, so a block that depth recurrence runs twice keeps two caches). Position-wise modules need nothing.
``undecodable_modules`` names the modules that mix positions without support; callers fall back to full
forwards for such models (and ``ar_generate`` also checks a few positions numerically, for modules that
mix positions without saying so).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import Tensor, nn


class DecodeCache:
    """Per-call state of the decode-aware modules, and how many positions have been consumed."""

    def __init__(self) -> None:
        self.position = 0
        self._states: dict[tuple[int, int], dict[str, Any]] = {}
        self._calls: dict[int, int] = {}

    def state(self, module: nn.Module) -> dict[str, Any]:
        n = self._calls.get(id(module), 0)
        self._calls[id(module)] = n + 1
        return self._states.setdefault((id(module), n), {})

    def begin_step(self) -> None:
        self._calls.clear()


def exact_positions(model: nn.Module) -> int | None:
    """The longest prefix incremental decoding reproduces exactly (None: any length); modules with a
    length-dependent computation declare ``decode_exact_limit``."""
    limits = [m.decode_exact_limit for m in model.modules() if getattr(m, "decode_exact_limit", None)]
    return min(limits) if limits else None


def undecodable_modules(model: nn.Module) -> list[str]:
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if getattr(type(m), "mixes_positions", False) and not getattr(type(m), "decode_aware", False)
    ]


@contextlib.contextmanager
def decoding(model: nn.Module, cache: DecodeCache) -> Iterator[None]:
    """The decode-aware modules see ``cache`` for the duration; afterwards each is as before, the attribute
    back on the class where it was (an instance attribute left behind is a new guard for a compiled forward)."""
    aware = [m for m in model.modules() if getattr(type(m), "decode_aware", False)]
    saved = [(m, m.__dict__.get("_decode", _ABSENT)) for m in aware]
    for m in aware:
        m._decode = cache
    try:
        yield
    finally:
        for m, before in saved:
            if before is _ABSENT:
                m.__dict__.pop("_decode", None)
            else:
                m._decode = before


_ABSENT = object()


def decode_logits(model: nn.Module, new_ids: Tensor, cache: DecodeCache) -> Tensor:
    """Logits of the positions in ``new_ids`` (B, t), given everything ``cache`` has already seen."""
    cache.begin_step()
    with decoding(model, cache):
        logits = model.logits(new_ids)
    cache.position += new_ids.shape[1]
    return logits
