"""FlashAttention-3: when ``flash_attn_interface`` imports, attention calls its ``flash_attn_func`` the way the
records do, and otherwise SDPA. FA3's kernels need a Hopper GPU, so a stand-in module takes its place here: an
explicit causal attention written in FA3's (B, T, H, D) layout, with its GQA head mapping and its bottom-right
causal alignment, that records what it was called with."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from conftest import STACKS, tiny_stack
from pgolf_core.model.decode import DecodeCache, decode_logits
from pgolf_core.model.gpt import build_model
from pgolf.plugins.attention import gqa


def reference_flash_attn_func(q, k, v, causal=False):
    """Causal attention as FA3 defines it: q (B, T, H, D), k/v (B, S, Hkv, D), query head h on KV head
    h // (H / Hkv), softmax scale 1/sqrt(D), and with S > T the mask aligned to the bottom right (query i sees
    keys up to S - T + i). Returns (B, T, H, D)."""
    bsz, t, heads, dim = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    assert heads % kv_heads == 0 and v.shape == k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim)
    if causal:
        allowed = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


@pytest.fixture
def fa3(monkeypatch):
    """A ``flash_attn_interface`` module whose ``flash_attn_func`` is the reference above, recording its calls,
    and CPU fp32 added to where FA3 runs (its real kernels take CUDA bf16/fp16 only)."""
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape), "causal": causal, "dtype": q.dtype})
        return reference_flash_attn_func(q, k, v, causal=causal)

    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    monkeypatch.setitem(gqa.FLASH_ATTN_3_RUNS_ON, "cpu", (torch.float32,))
    return calls


def _model(registry, *extra):
    stack = tiny_stack(registry, "model.num_layers=2", "model.model_dim=32", *extra)  # 4 query heads on 2 KV heads of 8 dims
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight nonzero (the output projections start at zero)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return stack, model


def _loss_and_grads(model, x, y):
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_without_the_module_attention_is_sdpa(registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import raises ImportError
    _, model = _model(registry)
    assert all(block.attn._flash_attn is None for block in model.blocks)


def test_fa3_is_called_in_the_records_layout_and_gives_the_sdpa_numbers(registry, fa3, monkeypatch):
    stack, flash_model = _model(registry)
    assert all(block.attn._flash_attn is not None for block in flash_model.blocks)
    x = torch.randint(0, stack.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    y = torch.roll(x, -1, dims=1)
    loss, grads = _loss_and_grads(flash_model, x, y)
    # Once per layer, in (B, T, H, D) / (B, T, Hkv, D), the KV heads not repeated, causal, in the activations' dtype.
    assert fa3 == [{"q": (3, 16, 4, 8), "k": (3, 16, 2, 8), "v": (3, 16, 2, 8), "causal": True, "dtype": torch.float32}] * 2

    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    _, sdpa_model = _model(registry)
    sdpa_model.load_state_dict(flash_model.state_dict())
    sdpa_loss, sdpa_grads = _loss_and_grads(sdpa_model, x, y)
    assert len(fa3) == 2  # the SDPA model never called it
    torch.testing.assert_close(loss, sdpa_loss, rtol=0, atol=1e-5)
    assert grads.keys() == sdpa_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], sdpa_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fa3_only_where_its_kernels_run(registry, fa3, monkeypatch):
    """Found, but the tensors are CPU fp32, which the real FA3 does not take: SDPA runs."""
    monkeypatch.delitem(gqa.FLASH_ATTN_3_RUNS_ON, "cpu")
    stack, model = _model(registry)
    x = torch.randint(0, stack.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    model(x, x)
    assert fa3 == []


def test_kv_cache_decoding_through_fa3_matches_a_full_forward(registry, fa3):
    """The cached path calls FA3 with fewer queries than keys: its bottom-right causal alignment is the mask."""
    stack, model = _model(registry)
    ids = torch.randint(0, stack.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model.logits(ids).reshape(2, 9, -1)
        cache, stepped, at = DecodeCache(), [], 0
        for n in (4, 1, 3, 1):  # a prompt, then single and several new positions over the cache
            stepped.append(decode_logits(model, ids[:, at : at + n], cache).reshape(2, n, -1))
            at += n
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, rtol=1e-5, atol=1e-5)
    assert {(c["q"][1], c["k"][1]) for c in fa3} >= {(4, 4), (1, 5), (3, 8), (1, 9)}


def test_both_kernels_compile_as_one_graph(registry, fa3, monkeypatch):
    """``fullgraph=True`` raises on a graph break: the FA3 call and the SDPA path each trace into one graph."""
    stack, flash_model = _model(registry)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    _, sdpa_model = _model(registry)
    x = torch.randint(0, stack.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    for model in (flash_model, sdpa_model):
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, x), model(x, x), rtol=0, atol=1e-6)
    assert len(fa3) == 4  # the flash model's two layers, compiled and eager; never the SDPA model
