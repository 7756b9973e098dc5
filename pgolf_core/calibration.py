"""Calibration: what a quantizer may use after training, and where its activations come from.

Hessian-aware quantizers (GPTQ) need activations. A quantizer with ``calibrate(ctx)`` (the ``Calibrating``
capability) gets a ``CalibrationContext`` before ``quantize`` is called; the phase is timed and logged. Where
the activations come from is a *calibration source*, and each source declares whether the challenge's rules
allow it (``SOURCES``): training batches read after the training clock has stopped are not allowed; sequences
the model generates itself are (PR #1019's precedent). The sources and the Hessian collection live here, so
every quantizer that calibrates draws its data the same, checked way:

* ``ar_generate``: the model samples its own sequences (with a KV cache where that reproduces full forwards,
  ``pgolf_core.model.decode``); ``decode_mismatch`` says when it cannot;
* ``CalibrationContext.train_batches``: batches of a fresh training-stream loader;
* ``collect_hessians``: ``XᵀX`` of every ``CastedLinear``'s input over a set of forwards, and of each output the
  model lists in ``hessian_taps`` (``{weight_name: module}``: a weight that no ``CastedLinear`` applies, whose
  input is that module's output, e.g. a tied head's token table applied to the final hidden state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import dataclasses
import torch
from torch import Tensor, nn

from .contracts import Batch, Compliance
from .model.decode import DecodeCache, decode_logits, exact_positions, undecodable_modules
from .model.layers import CastedLinear

SOURCES: dict[str, Compliance] = {
    "self_generated": Compliance(
        "calibration data", True, "sequences the trained model generates itself; no training or validation data read (PR #1019's precedent)"
    ),
    "train_after_clock": Compliance("calibration data", False, "training batches read after the training clock stopped"),
    "train_in_reserve": Compliance(
        "calibration data", True,
        "training batches read inside the seconds reserved from the training clock, so within the 600 s of training (PR #1060/#1218)",
    ),
    "no_data": Compliance("calibration data", True, "no calibration data"),
}
"""The calibration sources and the rules' verdict on each (a quantizer reports the one it used)."""


@dataclasses.dataclass
class CalibrationContext:
    model: nn.Module
    """The uncompiled GPT with the exported (averaged) weights loaded; the caller restores train/eval mode."""
    runtime: Any
    """``pgolf_core.runtime.Runtime``: device, ``autocast()``, rank/world size."""
    seed: int
    """The run's seed (``run.seed``)."""
    train_seq_len: int
    vocab_size: int
    log: Callable[..., None]
    train_batches: Callable[[int], Iterator[Batch]]
    """``train_batches(n)`` yields ``n`` batches from a fresh training-stream loader."""
    techniques: Sequence[Any] = ()
    """The stack's built modifier objects, for ``sequential_model``."""

    def sequential_model(self) -> contextlib.AbstractContextManager:
        """The model with every block run once, in order (depth recurrence and parallel wirings off) for the
        duration: PR #1392 collected its Hessians on such a copy of its model."""
        from .model.gpt import sequential_view

        return sequential_view(list(self.techniques))


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were before, afterwards: calibration runs the live model eagerly
    (sampling, decoding, Hessian hooks), and whatever it leaves on the modules (a RoPE table built for a sampling
    length, a decode attribute) would be a new guard, hence a new graph, for the compiled final evaluation.
    Parameters, buffers and submodules are kept as objects; their contents are not calibration's to change."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for m, before in saved:
            now = m.__dict__
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value


_MISSING = object()


def forward_hooks_on_linears(model: nn.Module, fn: Callable[[str, Tensor], None]) -> list[Any]:
    """Register ``fn(weight_name, input_2d)`` on every ``CastedLinear`` of ``model``; returns the handles."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            pname = f"{name}.weight"

            def hook(mod, inputs, output, pname=pname):
                x = inputs[0].detach()
                fn(pname, x.reshape(-1, x.shape[-1]))

            handles.append(module.register_forward_hook(hook))
    return handles


def accumulate_hessian(H: Tensor, x: Tensor, fp32: bool = False) -> None:
    """``H += XᵀX`` for layer inputs ``x`` (..., cols): cast to fp32; the product runs under whatever autocast
    is active (bf16 on GPU, as the references) unless ``fp32``; summed into ``H`` on H's device."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if fp32:
        with torch.autocast(device_type=x.device.type, enabled=False):
            prod = x.T @ x
    else:
        prod = x.T @ x
    H += prod.to(H.device)


def finish_hessians(hessians: dict[str, Tensor], count: int, damp: float) -> dict[str, Tensor]:
    """``H /= count``, then, if ``damp > 0``, ``H += damp·max(mean(diag H), 1e-6)·I`` (in place)."""
    for H in hessians.values():
        H /= count
        if damp > 0:
            H.diagonal().add_(damp * torch.diag(H).mean().clamp_min(1e-6))
    return hessians


def collect_hessians(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, damp: float = 0.0, fp32: bool = False
) -> dict[str, Tensor]:
    """Run ``model(x, y)`` on each batch (under the caller's autocast) with hooks on every ``CastedLinear``;
    returns ``{weight_name: H}`` in fp32 on the CPU, normalised by the number of forwards and damped.

    Every ``CastedLinear`` gets a matrix, zero if it never runs (as in the references). Each entry of the model's
    ``hessian_taps`` (``{weight_name: module}``, filled by techniques) gets the ``XᵀX`` of that module's output."""
    hessians = {
        f"{name}.weight": torch.zeros(module.in_features, module.in_features, dtype=torch.float32)
        for name, module in model.named_modules()
        if isinstance(module, CastedLinear)
    }
    handles = forward_hooks_on_linears(model, lambda name, x: accumulate_hessian(hessians[name], x, fp32=fp32))
    for wname, module in dict(getattr(model, "hessian_taps", None) or {}).items():

        def tap(mod, inputs, output, wname=wname):
            y = output.detach()
            if wname not in hessians:
                with torch.inference_mode(False):  # a normal tensor: it is divided in place afterwards
                    hessians[wname] = torch.zeros(y.shape[-1], y.shape[-1], dtype=torch.float32)
            accumulate_hessian(hessians[wname], y, fp32=fp32)

        handles.append(module.register_forward_hook(tap))
    count = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                model(batch[0], batch[1])
                count += 1
    finally:
        for h in handles:
            h.remove()
    return finish_hessians(hessians, max(count, 1), damp)


def decode_mismatch(model: nn.Module, vocab_size: int, device: torch.device, positions: int = 16) -> str | None:
    """Why incremental decoding cannot stand in for full forwards on this model, or None when it can.

    Checks the declared protocol first, then numerically: the logits of ``positions`` random tokens decoded one
    at a time must match the last position of a full forward over each prefix (relative 1e-4 in fp32, 5e-2
    under autocast) — a module that mixes positions without declaring it shows up here. Draws from its own
    generator: the sampling RNG is untouched.
    """
    missing = undecodable_modules(model)
    if missing:
        return f"no incremental path in {', '.join(missing[:3])}"
    positions = min(positions, exact_positions(model) or positions)
    probe = torch.randint(0, vocab_size, (1, positions), device=device, generator=torch.Generator(device=device).manual_seed(0))
    full = torch.cat([model.logits(probe[:, : t + 1]).reshape(1, t + 1, -1)[:, -1:].float() for t in range(positions)], dim=1)
    cache = DecodeCache()
    stepped = torch.cat([decode_logits(model, probe[:, i : i + 1], cache).reshape(1, 1, -1).float() for i in range(positions)], dim=1)
    tol = 5e-2 if torch.is_autocast_enabled(device.type) else 1e-4
    diff = (stepped - full).abs().max().item()
    if not diff <= tol * (1.0 + full.abs().max().item()):
        return f"incremental logits differ from a full forward by {diff:.3g}"
    return None


def ar_generate(
    model: nn.Module,
    *,
    num_seqs: int,
    seq_len: int,
    vocab_size: int,
    temperature: float = 0.8,
    batch_size: int = 8,
    seed: int = 42,
    rng: str = "pr1019",
    device: torch.device | str = "cpu",
    kv_cache: str = "off",
) -> list[Tensor]:
    """Sample ``num_seqs`` sequences of ``seq_len`` tokens from the model's logits, under
    ``torch.inference_mode`` and the caller's autocast; returns the batches, (bs, seq_len) each. ``kv_cache``
    (the caller checks ``decode_mismatch`` first): ``"exact"`` decodes one new
    position per forward while the prefix is within ``exact_positions(model)`` and runs full forwards after,
    ``"approximate"`` decodes throughout, ``"off"`` runs a full forward of the prefix per token.

    ``rng = "pr1019"``: one generator on ``device`` seeded with ``seed`` draws the first tokens and every
    sample; ``"pr1319"``: ``torch.manual_seed(seed)`` (global), the first tokens of the batch starting at
    sequence b from a generator seeded with b, samples from the default generator, logits in fp32 before the
    temperature."""
    device = torch.device(device)
    if kv_cache == "off":
        limit = 0
    elif kv_cache == "approximate":
        limit = seq_len
    else:
        limit = exact_positions(model) or seq_len
    last_logits = getattr(model, "last_logits", None) or (lambda ids: model.logits(ids).reshape(ids.shape[0], ids.shape[1], -1)[:, -1, :])
    if rng == "pr1319":
        torch.manual_seed(seed)
        gen = None
    else:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    out = []
    with torch.inference_mode():
        for start in range(0, num_seqs, batch_size):
            bs = min(batch_size, num_seqs - start)
            first_gen = torch.Generator(device=device).manual_seed(start) if rng == "pr1319" else gen
            tokens = torch.randint(0, vocab_size, (bs, 1), device=device, generator=first_gen)
            cache, new = DecodeCache(), tokens
            for _ in range(seq_len - 1):
                if tokens.shape[1] <= limit:
                    last = decode_logits(model, new, cache).reshape(bs, new.shape[1], -1)[:, -1, :]
                else:
                    last = last_logits(tokens)
                if rng == "pr1319":
                    probs = torch.softmax(last.float() / temperature, dim=-1)
                else:
                    probs = torch.softmax(last / temperature, dim=-1)
                new = torch.multinomial(probs, 1, generator=gen)
                tokens = torch.cat([tokens, new], dim=1)
            out.append(tokens)
    return out
