"""Each built-in technique's math on tiny tensors, against hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf_core.config.schema import ModelConfig
from pgolf_core.evaluate import EvalEnv, ValData, eval_val
from pgolf_core.model.spec import BuildContext
from pgolf.plugins.attention.gqa import CausalSelfAttention
from pgolf.plugins.averaging.final import FinalWeights
from pgolf.plugins.compressor.zlib import Zlib
from pgolf.plugins.compressor.zstd import Zstd
from pgolf.plugins.embedding.token import TokenEmbedding
from pgolf.plugins.head.softcap import SoftcapHead
from pgolf.plugins.loss.cross_entropy import CrossEntropy
from pgolf.plugins.init.baseline import BaselineInitParams, build as build_init
from pgolf.plugins.mlp.relu2 import Relu2MLP, Relu2Params, build as build_mlp
from pgolf.plugins.optimizer.muon import Muon, MuonParams, build as build_muon, zeropower_via_newtonschulz5
from pgolf.plugins.quantizer.int8_rowwise import Int8Rowwise, Int8RowwiseParams
from pgolf.plugins.residual.resid_mix import ResidMixBlock
from pgolf.plugins.schedule.linear_warmdown import LinearWarmdown, LinearWarmdownParams
from pgolf.plugins.tokenizer.sentencepiece import PieceBytes
from pgolf.plugins.topology.unet import UNetSkips

from conftest import reference_roles


def ctx(**model):
    from pgolf_core.config.schema import DataConfig, RunConfig

    return BuildContext(ModelConfig(**model), RunConfig(), DataConfig())


def test_token_embedding_is_rms_normalised():
    torch.manual_seed(0)
    emb = TokenEmbedding(10, 8)
    x = emb(torch.tensor([[1, 2, 3]]))
    assert x.shape == (1, 3, 8)
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(1, 3), atol=1e-5, rtol=0)


def test_gqa_attention_matches_a_hand_written_reference():
    torch.manual_seed(0)
    dim, heads, kv, T = 16, 4, 2, 5
    attn = CausalSelfAttention(dim, heads, kv, rope_base=10000.0, qk_gain_init=1.5)
    nn.init.normal_(attn.proj.weight, std=0.1)
    x = torch.randn(2, T, dim)
    hd = dim // heads
    q = (x @ attn.c_q.weight.T).view(2, T, heads, hd).transpose(1, 2)
    k = (x @ attn.c_k.weight.T).view(2, T, kv, hd).transpose(1, 2)
    v = (x @ attn.c_v.weight.T).view(2, T, kv, hd).transpose(1, 2)
    q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat((a * cos + b * sin, -a * sin + b * cos), -1)

    q, k = rope(q) * 1.5, rope(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, dim) @ attn.proj.weight.T
    torch.testing.assert_close(attn(x), y, atol=1e-5, rtol=1e-5)


def test_gqa_attention_is_causal():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, 2, 10000.0, 1.5)
    nn.init.normal_(attn.proj.weight)
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(attn(x)[:, :4], attn(x2)[:, :4])


def test_relu2_mlp_width_and_formula():
    torch.manual_seed(0)
    mlp = build_mlp(Relu2Params(mult=1.5), ctx(model_dim=8))
    assert isinstance(mlp, Relu2MLP) and mlp.fc.out_features == 12 and mlp.proj._zero_init
    nn.init.normal_(mlp.proj.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), torch.relu(x @ mlp.fc.weight.T).square() @ mlp.proj.weight.T)


def test_resid_mix_block_formula():
    torch.manual_seed(0)
    attn, mlp = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    block = ResidMixBlock(4, attn, mlp)
    with torch.no_grad():
        block.resid_mix.copy_(torch.tensor([[0.5] * 4, [2.0] * 4]))
        block.attn_scale.fill_(0.3)
        block.mlp_scale.fill_(-0.7)
    x, x0 = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    h = 0.5 * x + 2.0 * x0
    h = h + 0.3 * attn(F.rms_norm(h, (4,)))
    h = h + -0.7 * mlp(F.rms_norm(h, (4,)))
    torch.testing.assert_close(block(x, x0), h)
    assert block.resid_mix.tolist() != [[1.0] * 4, [0.0] * 4]  # sanity: we changed the init
    fresh = ResidMixBlock(4, attn, mlp)
    assert fresh.resid_mix.tolist() == [[1.0] * 4, [0.0] * 4]


def test_unet_skips_pair_mirrored_layers():
    unet = UNetSkips(5, 3)
    assert unet.num_encoder_layers == 2 and unet.skip_weights.shape == (2, 3)
    with torch.no_grad():
        unet.skip_weights.copy_(torch.tensor([[10.0] * 3, [100.0] * 3]))
    seen = []

    class Add(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, x, x0, aux=None):
            seen.append(self.i)
            return x + 1

    blocks = nn.ModuleList([Add(i) for i in range(5)])
    out = unet(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), blocks)
    # enc: 1, 2 (skips [1, 2]); dec0: 2 + 10*2 = 22 -> 23; dec1: 23 + 100*1 = 123 -> 124; dec2 -> 125
    assert seen == [0, 1, 2, 3, 4] and out.flatten().tolist() == [125.0] * 3


def test_softcap_head_bounds_logits_and_uses_fp32_cross_entropy():
    torch.manual_seed(0)
    head = SoftcapHead(4, 7, tied=True, logit_softcap=2.0)
    w = torch.randn(7, 4)
    x = torch.randn(1, 3, 4)
    logits = head.logits(x, w)
    assert logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh((x.reshape(-1, 4) @ w.T) / 2.0))
    torch.testing.assert_close(head.cap(head.project(x, w)), logits)
    y = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(CrossEntropy()(logits.half(), y.reshape(-1)), F.cross_entropy(logits.half().float(), y.reshape(-1)))
    untied = SoftcapHead(4, 7, tied=False, logit_softcap=2.0)
    assert untied.lm_head is not None and untied.lm_head._zero_init
    assert untied.output_weight(w) is untied.lm_head.weight and head.output_weight(w) is w


def test_baseline_init_draws_the_embedding_and_zeroes_projections():
    from pgolf_core.config.load import load_stack  # noqa: F401  (keeps import order like the engine)
    from pgolf.plugins.embedding.token import TokenEmbedding as TE

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = TE(1000, 64)
            self.mlp = Relu2MLP(64, 128)

        def token_embedding(self):
            return self.embedding.tok_emb.weight

    torch.manual_seed(0)
    m = M()
    build_init(BaselineInitParams(tied_embed_init_std=0.005), ctx())(m)
    assert m.token_embedding().std().item() == pytest.approx(0.005, rel=0.05)
    assert m.mlp.proj.weight.abs().sum() == 0 and m.mlp.fc.weight.abs().sum() > 0


def test_newton_schulz_orthogonalises_in_bf16():
    torch.manual_seed(0)
    g = torch.randn(32, 16)
    x = zeropower_via_newtonschulz5(g, steps=5)
    assert x.dtype == torch.bfloat16 and x.shape == g.shape
    s = torch.linalg.svdvals(x.float())
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands singular values near 1, not exactly


def test_muon_step_is_lr_times_scaled_orthogonal_update():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    before, grad = p.detach().clone(), p.grad.clone()
    opt = Muon([p], lr=0.1, momentum=0.9, backend_steps=5)
    opt.step()
    g = grad + 0.9 * grad  # nesterov on a fresh buffer: g + momentum * buf, buf = g
    upd = zeropower_via_newtonschulz5(g, 5) * math.sqrt(8 / 4)
    torch.testing.assert_close(p.detach(), before - 0.1 * upd.float().to(torch.bfloat16).float(), atol=1e-6, rtol=0)


def test_muon_adam_grouping_lrs_and_momentum_warmup(registry):
    from conftest import tiny_stack
    from pgolf_core.model.gpt import build_model

    stack = tiny_stack(registry)
    model, _ = build_model(stack, registry)
    params = MuonParams(momentum_warmup_steps=10, momentum_warmup_start=0.5, momentum=0.9)

    class RT:
        compile = False

        @staticmethod
        def compiled(fn, **kwargs):
            return fn

    opts = build_muon(params, ctx())(model, RT())
    tok, muon, scalar = opts.optimizers
    assert tok.param_groups[0]["params"] == [model.token_embedding()] and tok.param_groups[0]["lr"] == 0.05
    assert len(muon.param_groups[0]["params"]) == 4 * 6  # c_q, c_k, c_v, proj, fc, proj per block
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
    assert any(p is model.topology.skip_weights for p in scalar.param_groups[0]["params"])
    assert sum(p.numel() for o in opts.optimizers for g in o.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    opts.before_step(5)
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.7)
    opts.set_lr_scale(0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02) and tok.param_groups[0]["lr"] == pytest.approx(0.025)


def test_linear_warmdown_by_steps_and_by_wallclock():
    by_steps = LinearWarmdown(LinearWarmdownParams(warmdown_iters=4), iterations=10, max_wallclock_seconds=0)
    assert [by_steps.lr_mul(s, 0) for s in range(11)] == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25, 1]
    by_time = LinearWarmdown(LinearWarmdownParams(warmdown_iters=100), iterations=10_000, max_wallclock_seconds=10)
    assert by_time.lr_mul(10, 1000.0) == pytest.approx(0.9)  # 100 ms/step -> 10 s window; 9 s remain
    assert by_time.lr_mul(100, 9000.0) == pytest.approx(1000.0 / 9000.0)
    assert by_time.lr_mul(200, 4000.0) == 1.0  # 20 ms/step -> 2 s window; 6 s remaining
    assert LinearWarmdown(LinearWarmdownParams(warmdown_iters=0), 10, 0).lr_mul(9, 0) == 1.0


def test_int8_rowwise_round_trip_and_passthrough_rules():
    torch.manual_seed(0)
    quant = Int8Rowwise(Int8RowwiseParams(keep_float_max_numel=16))
    sd = {
        "blocks.0.mlp.fc.weight": torch.randn(8, 8),
        "blocks.0.attn_scale": torch.randn(8),
        "small.weight": torch.randn(4),
        "vector": torch.randn(32),
        "count": torch.tensor([3], dtype=torch.int64),
    }
    obj, stats = quant.quantize(sd, reference_roles(sd))
    assert obj["quantized"]["blocks.0.mlp.fc.weight"].dtype == torch.int8
    assert obj["scales"]["blocks.0.mlp.fc.weight"].shape == (8,)
    assert obj["passthrough"]["blocks.0.attn_scale"].dtype == torch.float32  # control tensor stays fp32
    assert obj["passthrough"]["small.weight"].dtype == torch.float16
    assert obj["scales"]["vector"].ndim == 0
    out = quant.dequantize(obj)
    assert set(out) == set(sd) and out["small.weight"].dtype == torch.float32
    for name in ("blocks.0.mlp.fc.weight", "vector"):
        scale = obj["scales"][name].float()
        scale = scale[:, None] if scale.ndim else scale
        clip = scale * 127.0
        # rounding error at most half a step, plus whatever the percentile clip cut off
        bound = scale * 0.5 + (sd[name].abs() - clip).clamp_min(0) + 1e-6
        assert torch.all((out[name] - sd[name]).abs() <= bound)
    assert torch.equal(out["count"], sd["count"])
    assert stats["num_float_tensors"] == 2 and stats["num_nonfloat_tensors"] == 1


@pytest.mark.parametrize("comp", [Zlib(9), Zstd(22)])
def test_compressors_round_trip_and_shrink(comp):
    data = bytes(range(256)) * 200
    blob = comp.compress_bytes(data)
    assert comp.decompress_bytes(blob) == data and len(blob) < len(data) // 10
    obj = {"quantized": {"w": torch.zeros(64, 64, dtype=torch.int8)}, "meta": {"w": "per_row"}}  # what compress receives
    back = comp.decompress(comp.compress(obj))
    assert back["meta"] == obj["meta"] and torch.equal(back["quantized"]["w"], obj["quantized"]["w"])


def test_final_weights_exports_the_state_dict():
    m = nn.Linear(2, 2)
    out = FinalWeights().export_weights(m)
    assert list(out) == ["weight", "bias"] and out["weight"] is m.state_dict()["weight"] or torch.equal(out["weight"], m.weight)


def test_eval_val_bpb_is_loss_over_ln2_times_tokens_per_byte():
    class Uniform(nn.Module):
        def forward(self, x, y):
            return torch.full((), math.log(4.0))

    tokens = torch.tensor([1, 2, 3, 2, 3, 2, 3, 2, 3])
    val = ValData(tokens, PieceBytes(torch.tensor([0, 1, 2, 3], dtype=torch.int16), torch.tensor([False, False, True, False]), torch.tensor([True, False, False, False])))
    env = EvalEnv(val, 4, 8, 1, 0, 1, torch.device("cpu"))
    loss, bpb = eval_val(Uniform(), env)
    # targets 2,3,2,3,2,3,2,3: bytes 2,3,... and +1 for each leading-space token (id 2) after a non-boundary token
    nbytes = 4 * 2 + 4 * 3 + 4
    assert loss == pytest.approx(math.log(4.0))
    assert bpb == pytest.approx(2.0 * 8 / nbytes)
