"""Incremental decoding (pgolf_core.model.decode): the KV-cache path gives a full forward's logits."""

from __future__ import annotations

import pytest
import torch

from pgolf_core.model.sites import Site

from conftest import STACKS, tiny_stack
from pgolf_core.model.decode import DecodeCache, decode_logits, exact_positions, undecodable_modules
from pgolf_core.model.gpt import build_model
from pgolf.plugins.quantizer.gptq import ar_generate, decode_mismatch

PR1319_TINY = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=4",
               "modifier[2].rope_dims=8", "modifier[2].ntk_seq_len=8", "modifier[5].layers=[2, 3]"]


def _model(registry, *extra: str, path=STACKS / "pr1319.toml"):
    stack = tiny_stack(registry, *(PR1319_TINY if path.name == "pr1319.toml" else ()), *extra, path=path)
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights: nothing zero, so every path contributes
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return stack, model.eval()


def _stepwise(model, ids, chunks):
    cache, out, at = DecodeCache(), [], 0
    for n in chunks:
        out.append(decode_logits(model, ids[:, at : at + n], cache).reshape(ids.shape[0], n, -1))
        at += n
    assert cache.position == ids.shape[1]
    return torch.cat(out, dim=1)


def _last_of_each_prefix(model, ids):
    """What generation reads: the last position of a full forward over each prefix (NTK RoPE's base depends on
    the prefix length, so a single forward of the whole sequence is a different computation past ntk_seq_len)."""
    n = ids.shape[1]
    return torch.stack([model.logits(ids[:, : t + 1]).reshape(ids.shape[0], t + 1, -1)[:, -1] for t in range(n)], dim=1)


def test_decoding_matches_a_full_forward_past_the_ntk_length(registry):
    """Bigram hash, SmearGate, partial NTK RoPE (base rescaled past 8 positions), XSA, value embeddings."""
    stack, model = _model(registry)
    ids = torch.randint(0, stack.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _last_of_each_prefix(model, ids)
        stepped = _stepwise(model, ids, [1] * 20)
        torch.testing.assert_close(stepped[:, :8], want[:, :8], rtol=1e-5, atol=1e-5)  # exact up to ntk_seq_len
        assert (stepped[:, 8:] - want[:, 8:]).abs().max() > 1e-3  # past it, earlier hidden states depend on T
        assert exact_positions(model) == 8
        chunked = _stepwise(model, ids, [5, 1, 6, 8])  # several new positions at once: a causal mask over the cache
        torch.testing.assert_close(chunked[:, [4, 5]], want[:, [4, 5]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_stepwise(model, ids[:, :8], [8]), want[:, :8], rtol=1e-5, atol=1e-5)
    stack, model = _model(registry, "modifier[2].ntk_seq_len=0")  # no NTK: exact at any length, chunks too
    with torch.no_grad():
        want = _last_of_each_prefix(model, ids)
        assert exact_positions(model) is None
        torch.testing.assert_close(_stepwise(model, ids, [1] * 20), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_stepwise(model, ids, [5, 1, 6, 8]), want, rtol=1e-5, atol=1e-5)
    assert undecodable_modules(model) == [] and decode_mismatch(model, stack.model.vocab_size, torch.device("cpu")) is None


def test_decoding_keeps_one_cache_per_pass_of_a_recurrent_block(registry):
    stack = tiny_stack(registry, "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=4",
                       "modifier[1].rope_dims=8", "modifier[4].layers=[2, 3]", "modifier[5].layers=[1]",
                       'modifier[6].layers="2:"', path=STACKS / "pr1392.toml")
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    model.eval()
    model.topology.schedule.active = True  # layer 1 runs twice: its attention is called twice per step
    calls = []
    hook = model.blocks[1].attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model.logits(torch.zeros(1, 3, dtype=torch.long))
    hook.remove()
    assert len(calls) == 2
    ids = torch.randint(0, stack.model.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(_stepwise(model, ids, [1] * 12), _last_of_each_prefix(model, ids), rtol=1e-5, atol=1e-5)


def test_a_position_mixing_module_without_a_decode_path_turns_the_cache_off(registry):
    from pgolf.plugins.residual.canon import CanonLayer, CanonParams

    _, plain = _model(registry)
    plain.blocks[0].add_module("conv_probe", CanonLayer(64, CanonParams()))
    assert undecodable_modules(plain) == ["blocks.0.conv_probe"]
    assert decode_mismatch(plain, 1024, torch.device("cpu")) == "no incremental path in blocks.0.conv_probe"

    class Shift(torch.nn.Module):  # mixes positions without declaring it: caught by the numeric probe
        def forward(self, x, input_ids):
            return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

    _, sneaky = _model(registry)
    sneaky.embedding.x0 = Site({"shift": Shift()})  # installed at the embedding's x0 site after the build
    assert decode_mismatch(sneaky, 1024, torch.device("cpu")).startswith("incremental logits differ from a full forward by")


@pytest.mark.parametrize("rng", ["pr1019", "pr1319"])
def test_exact_kv_cache_generation_samples_the_references_tokens(registry, rng):
    """24 tokens with ntk_seq_len 8: cached for 8 positions, full forwards after; the same samples as no cache."""
    stack, model = _model(registry)
    kwargs = dict(num_seqs=3, seq_len=24, vocab_size=stack.model.vocab_size, batch_size=2, seed=5, rng=rng)
    full = ar_generate(model, **kwargs, kv_cache="off")
    cached = ar_generate(model, **kwargs, kv_cache="exact")
    assert [b.shape for b in full] == [(2, 24), (1, 24)]
    for a, b in zip(full, cached, strict=True):
        assert torch.equal(a, b)
    approx = ar_generate(model, **kwargs, kv_cache="approximate")
    assert [b.shape for b in approx] == [(2, 24), (1, 24)]
    assert all(torch.equal(a[:, :9], b[:, :9]) for a, b in zip(full, approx, strict=True))  # same until NTK


def test_probe_uses_only_exact_positions(registry):
    stack, model = _model(registry)  # ntk_seq_len 8 < the probe's 16 positions: probing past 8 would "fail"
    with torch.no_grad():
        assert decode_mismatch(model, stack.model.vocab_size, torch.device("cpu")) is None


def test_decoding_and_calibration_leave_no_state_on_the_model(registry):
    """A compiled forward guards on the modules' attributes: decoding must put its attribute back on the class,
    and calibration (sampling, decoding, Hessian hooks on the live model) leaves every module as it found it:
    no RoPE table built for a sampling length, no inference tensor, no decode attribute."""
    from pgolf_core.calibration import state_kept

    stack, model = _model(registry)
    ids = torch.randint(0, stack.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    aware = [m for m in model.modules() if getattr(type(m), "decode_aware", False)]
    assert aware and all("_decode" not in m.__dict__ for m in aware)
    with torch.no_grad():
        _stepwise(model, ids[:, :5], [1] * 5)
    assert all("_decode" not in m.__dict__ for m in aware)  # back on the class, where the compiled graph saw it

    with torch.no_grad():
        model(ids, ids)  # the tables a training-length forward builds
    before = [(m, dict(m.__dict__)) for m in model.modules()]
    rotary = model.blocks[0].attn.rotary
    table = rotary._cos_cached
    with state_kept(model):
        with torch.inference_mode():
            model.logits(ids[:, :7])  # a sampling length, under inference mode: the cache is rebuilt for 7 positions
        assert rotary._seq_len_cached == 7 and not rotary._cos_cached.is_inference()
        model.extra_attribute = 1
    assert rotary._cos_cached is table and rotary._seq_len_cached == 16 and not hasattr(model, "extra_attribute")
    assert all(m.__dict__.keys() == d.keys() and all(m.__dict__[k] is v for k, v in d.items()) for m, d in before)
