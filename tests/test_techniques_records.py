"""Math of the #315/#400/#450 techniques on tiny tensors, against hand-written formulas."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import STACKS, reference_roles, tiny_stack
from pgolf_core.model.gpt import build_model
from pgolf_core.model.layers import CastedLinear
from pgolf.plugins.attention.partial_rope import PartialRotary
from pgolf.plugins.attention.xsa import ExclusiveSelfAttention, exclusive_self_attention
from pgolf.plugins.averaging.ema import EMA, EMAParams
from pgolf.plugins.averaging.swa import SWA, TightSWAParams
from pgolf.plugins.embedding.bigram_hash import BigramHashEmbedding
from pgolf.plugins.embedding.smeargate import SmearGate
from pgolf.plugins.evaluator.sliding_window import window_starts
from pgolf.plugins.quantizer.common import classify
from pgolf.plugins.quantizer.int6_absmax import Int6Absmax, Int6AbsmaxParams
from pgolf.plugins.quantizer.int6_percentile import Int6Percentile, Int6PercentileParams
from pgolf.plugins.quantizer.late_qat import FakeQuant, LateQAT, LateQATParams
from pgolf.plugins.residual.canon import CanonLayer, CanonParams
from pgolf.plugins.optimizer.muon import Muon


class State:
    def __init__(self, model, step=0, lr_scale=1.0):
        self.model, self.step, self.lr_scale = model, step, lr_scale
        self.lines: list[str] = []
        self.log = self.lines.append


def test_xsa_removes_the_own_value_component():
    torch.manual_seed(0)
    y, v = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)  # (B, T, H, D) and (B, T, Hkv, D), the heads_out layout
    out = exclusive_self_attention(y, v)
    for h in range(4):
        vh = F.normalize(v[0, :, h // 2], dim=-1)
        torch.testing.assert_close(out[0, :, h], y[0, :, h] - (y[0, :, h] * vh).sum(-1, keepdim=True) * vh)
        assert (out[0, :, h] * vh).sum(-1).abs().max() < 1e-5  # orthogonal to the own value
    gated = ExclusiveSelfAttention(gate_init=0.0)  # PR #400's learnable gate: halfway at sigmoid(0)
    torch.testing.assert_close(gated(y, v, None), y + 0.5 * (out - y))
    assert torch.equal(ExclusiveSelfAttention()(y, v, None), out)


def test_partial_rope_rotates_only_the_first_dims_and_ntk_rescales():
    rot = PartialRotary(16, base=10000.0, rope_dims=4, ntk_seq_len=8)
    cos, sin = rot(4, torch.device("cpu"), torch.float32)
    assert cos.shape[-1] == 2 and rot.decode_exact_limit == 8
    x = torch.randn(1, 1, 4, 16)
    out = rot.apply(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])  # position 0: angle 0
    cos16, _ = rot(16, torch.device("cpu"), torch.float32)  # 16 > 8: base * 2^(4/2)
    new_base = 10000.0 * (2.0 ** (4 / 2))
    expected = torch.cos(torch.arange(16.0)[:, None] / new_base ** (torch.arange(0, 4, 2) / 4.0))
    torch.testing.assert_close(cos16[0, 0], expected)


def test_bigram_hash_buckets_and_zero_start():
    torch.manual_seed(0)
    emb = BigramHashEmbedding(11, 4, 8, 0.05)
    ids = torch.tensor([[3, 5, 7]])
    buckets = emb.bigram_hash(ids)
    assert buckets.tolist() == [[10, (36313 * 5 ^ 27191 * 3) % 10, (36313 * 7 ^ 27191 * 5) % 10]]
    assert emb.embed_pairs(ids).abs().sum() == 0  # zero table at init
    x = torch.randn(1, 3, 8)
    assert torch.equal(emb(x, ids), x)  # at the lookup site it adds nothing yet
    assert emb.scale.item() == pytest.approx(0.05)


def test_smeargate_blends_with_previous_position():
    gate = SmearGate(2)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(gate(x), torch.tensor([[[0.5, 1.0], [2.0, 3.0]]]))


def test_canon_layer_is_a_causal_depthwise_conv_with_delta_gate():
    torch.manual_seed(0)
    layer = CanonLayer(3, CanonParams(kernel=3, delta_gate_init=-4.0))
    x = torch.randn(2, 5, 3)
    w = layer.conv.weight[:, 0, :]  # (C, K)
    padded = torch.cat([torch.zeros(2, 2, 3), x], dim=1)
    conv = sum(w[:, k] * padded[:, k : k + 5] for k in range(3))
    torch.testing.assert_close(layer(x), x + torch.sigmoid(torch.tensor(-4.0)) * conv, atol=1e-6, rtol=1e-5)
    x2 = x.clone()
    x2[:, 3:] += 1
    torch.testing.assert_close(layer(x)[:, :3], layer(x2)[:, :3])  # causal


def test_fake_quant_switch_is_a_buffer_and_straight_through():
    torch.manual_seed(0)
    lin = CastedLinear(8, 4, bias=False)
    lin.weight_transform = FakeQuant(6)  # what late QAT installs at every CastedLinear's weight site
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)  # off until switched
    lin.weight_transform.on.fill_(1.0)
    w = lin.weight.detach()
    scale = (w.abs().amax(1) / 31).clamp_min(1 / 31)
    wq = torch.clamp(torch.round(w / scale[:, None]), -32, 31) * scale[:, None]
    out = lin(x)
    torch.testing.assert_close(out, x @ wq.T)
    out.sum().backward()
    torch.testing.assert_close(lin.weight.grad, x.sum(0)[None, :].expand(4, 8))  # identity gradient
    lin.eval()
    torch.testing.assert_close(lin(x), x @ w.T)  # never at eval time


def test_late_qat_turns_on_under_compile_without_recompiling(registry):
    torch._dynamo.reset()
    stack = tiny_stack(registry, 'modifier[5].mode="working"', "modifier[5].threshold=0.5", path=STACKS / "pr315.toml")
    torch.manual_seed(0)
    model, mods = build_model(stack, registry)
    qat = next(m for m in mods if isinstance(m, LateQAT))
    assert qat.params == LateQATParams(threshold=0.5, mode="working")
    with torch.no_grad():  # output projections start at zero; give the blocks something to quantize
        for block in model.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.05)
            nn.init.normal_(block.mlp.proj.weight, std=0.05)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    x = torch.randint(0, 1024, (2, 16))
    before = compiled(x, x).item()
    state = State(model, step=7, lr_scale=0.4)
    qat.on_step_start(state)
    after = compiled(x, x).item()
    assert after != before  # the compiled graph now sees quantized weights
    model.eval()
    assert compiled(x, x).item() == pytest.approx(before, abs=1e-6)  # eval: no fake quant
    assert state.lines == ["late_qat:enabled step:7 scale:0.4000"]


def test_late_qat_inert_mode_only_logs(registry):
    stack = tiny_stack(registry, path=STACKS / "pr315.toml")
    model, mods = build_model(stack, registry)
    qat = next(m for m in mods if isinstance(m, LateQAT))
    state = State(model, step=3, lr_scale=0.01)
    qat.on_step_start(state)
    assert qat.enabled and qat.quantizers == []
    assert not any(isinstance(m, CastedLinear) and m.weight_transform is not None for m in model.modules())  # no STE branch at all
    assert "inert" in state.lines[0]


def test_ema_update_and_export():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(EMAParams(decay=0.5))
    state = State(model)
    ema.on_train_start(state)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.after_optimizer_step(state)
    assert ema.export_weights(model)["weight"].tolist() == [[2.0, 2.0]]
    assert state.lines == ["ema:applying EMA weights"]


def test_tight_swa_keeps_the_first_snapshots_after_the_threshold():
    model = nn.Linear(1, 1, bias=False)
    swa = SWA(TightSWAParams(every=2, start_scale=0.5, max_checkpoints=2))
    state = State(model)
    swa.on_train_start(state)
    for step, scale, value in [(2, 0.9, 100.0), (3, 0.4, 50.0), (4, 0.4, 1.0), (6, 0.3, 2.0), (8, 0.2, 9.0)]:
        with torch.no_grad():
            model.weight.fill_(value)
        state.step, state.lr_scale = step, scale
        swa.after_optimizer_step(state)
    assert swa.count == 2  # steps 4 and 6; step 8 is past the cap, step 2 above the threshold, 3 off-cadence
    assert swa.export_weights(model)["weight"].item() == pytest.approx(1.5)
    assert state.lines == ["swa:start step:4", "swa:applying averaged 2 checkpoints"]


def test_int6_absmax_rules():
    torch.manual_seed(0)
    q = Int6Absmax(Int6AbsmaxParams(keep_float_max_numel=16))
    sd = {
        "blocks.0.mlp.fc.weight": torch.randn(8, 4),
        "embedding.tok_emb.weight": torch.randn(8, 4),
        "blocks.0.attn_scale": torch.randn(4),
        "topology.skip_weights": torch.randn(5, 4),
    }
    obj, _ = q.quantize(sd, reference_roles(sd))
    meta, w = obj["m"], obj["w"]
    assert meta["blocks.0.mlp.fc.weight"] == {"type": "int6"} and meta["embedding.tok_emb.weight"] == {"type": "int8"}
    assert meta["blocks.0.attn_scale"] == "passthrough" and w["blocks.0.attn_scale"].dtype == torch.float16
    assert meta["topology.skip_weights"] == "passthrough_ctrl" and w["topology.skip_weights"].dtype == torch.float32
    qv = w["blocks.0.mlp.fc.weight.q"]
    assert qv.min() >= -32 and qv.max() <= 31
    out = q.dequantize(obj)
    scale = w["blocks.0.mlp.fc.weight.scale"].float()[:, None]
    assert torch.all((out["blocks.0.mlp.fc.weight"] - sd["blocks.0.mlp.fc.weight"]).abs() <= scale / 2 + 1e-6)
    assert classify("embedding.bigram.proj.weight") == "attn"  # the reference's ".proj." rule


def test_int6_percentile_bits_per_category_and_control_fp32():
    torch.manual_seed(0)
    q = Int6Percentile(Int6PercentileParams(keep_float_max_numel=16))
    sd = {"blocks.0.attn.c_q.weight": torch.randn(8, 8), "embedding.tok_emb.weight": torch.randn(8, 8), "embedding.bigram.scale": torch.tensor(0.05)}
    obj, stats = q.quantize(sd, reference_roles(sd))
    assert obj["qmeta"]["blocks.0.attn.c_q.weight"]["bits"] == 6 and obj["qmeta"]["embedding.tok_emb.weight"]["bits"] == 8
    assert obj["quantized"]["blocks.0.attn.c_q.weight"].abs().max() <= 32
    assert obj["passthrough"]["embedding.bigram.scale"].dtype == torch.float32
    out = q.dequantize(obj)
    assert set(out) == set(sd) and stats["num_int6"] == 1 and stats["num_int8"] == 1


def test_sliding_window_starts_and_scored_spans():
    starts = window_starts(10, 4, 2)
    assert starts == [0, 2, 4, 6, 8]
    scored = []
    for ws in starts:
        wlen = min(ws + 4, 10) - ws
        s = 0 if ws == 0 else max(wlen - 2, 0)
        scored += list(range(ws + s, ws + wlen))
    # every position scored; the clipped tail windows re-score the last stride tokens, as the reference does
    assert sorted(set(scored)) == list(range(10)) and scored.count(9) == 2


def test_sliding_window_equals_full_eval_when_stride_is_the_window(registry):
    from pgolf.testing import TableBytes
    from pgolf_core.evaluate import EvalEnv, ValData, eval_val
    from pgolf.plugins.evaluator.sliding_window import eval_sliding

    torch.manual_seed(0)
    stack = tiny_stack(registry)
    model, _ = build_model(stack, registry)
    tokens = torch.randint(1, 1024, (16 * 4 + 1,))
    val = ValData(tokens, TableBytes(torch.ones(1024, dtype=torch.int16)))
    env = EvalEnv(val, 16, 64, 1, 0, 1, torch.device("cpu"), base_model=model)
    full = eval_val(model, env)
    slid = eval_sliding(model, env, 16, 16, 3)
    assert slid == pytest.approx(full, rel=1e-5)


def test_muon_weight_decay_is_decoupled_and_scaled_by_lr():
    p = nn.Parameter(torch.ones(4, 4))
    p.grad = torch.zeros(4, 4)
    Muon([p], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5).step()
    torch.testing.assert_close(p.detach(), torch.full((4, 4), 0.95))  # zero grad: only the decay


def test_value_embeddings_and_catalytic_gates_in_the_model(registry):
    stack = tiny_stack(registry, "modifier[6].layers=[2, 3]", path=STACKS / "pr450.toml")
    model, _ = build_model(stack, registry)
    names = [n for n, _ in model.named_parameters()]
    assert "ve_shared.embed.weight" in names and "ve_shared.ve_layer_scales.0" in names
    assert names.index("ve_shared.embed.weight") > max(i for i, n in enumerate(names) if n.startswith("blocks."))
    # the catalytic gates sit at each block's gain sites (ones-init, ordinary weights)
    assert all("catalytic_residuals" in b.attn_gain and "catalytic_residuals" in b.mlp_gain for b in model.blocks)
    assert "blocks.0.attn_gain.catalytic_residuals.gate" in names and "blocks.0.mlp_gain.catalytic_residuals.gate" in names
    assert torch.equal(model.blocks[0].attn_gain["catalytic_residuals"].gate, torch.ones(stack.model.model_dim))
    keys = [b.attn.qkv["value_embedding"].key if b.attn.qkv is not None and "value_embedding" in b.attn.qkv else None for b in model.blocks]
    assert keys == [None, None, "ve_2", "ve_3"]
    x = torch.randint(0, 1024, (1, 8))
    assert set(model.ve_shared.aux(x)) == {"ve_2", "ve_3"}
    model(x, x).backward()
    assert model.ve_shared.embed.weight.grad is not None


def test_int5_categories_take_precedence_and_use_the_int5_range():
    torch.manual_seed(0)
    q = Int6Absmax(Int6AbsmaxParams(keep_float_max_numel=16, int5_categories="mlp"))
    sd = {"blocks.0.mlp.fc.weight": torch.randn(8, 4), "blocks.0.attn.c_q.weight": torch.randn(8, 4)}
    obj, stats = q.quantize(sd, reference_roles(sd))
    assert obj["m"]["blocks.0.mlp.fc.weight"] == {"type": "int5"} and obj["m"]["blocks.0.attn.c_q.weight"] == {"type": "int6"}
    q5 = obj["w"]["blocks.0.mlp.fc.weight.q"]
    assert q5.min() >= -16 and q5.max() <= 15 and q5.abs().max() == 15
    out = q.dequantize(obj)
    scale = obj["w"]["blocks.0.mlp.fc.weight.scale"].float()[:, None]
    assert torch.all((out["blocks.0.mlp.fc.weight"] - sd["blocks.0.mlp.fc.weight"]).abs() <= scale / 2 + 1e-6)
