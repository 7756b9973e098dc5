"""The modifiers that act on the spec (install at a host's site, replace a host's part) and the remaining
built-ins, one by one, plus the rule that every built-in technique has a test that imports its module."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dataclasses

from conftest import STACKS, tiny_stack
from pgolf.testing import TableBytes, tiny_model
from pgolf_core.errors import ConfigError
from pgolf_core.evaluate import EvalEnv, ValData, eval_val
from pgolf_core.model.gpt import build_model
from pgolf_core.model.sites import ModifierName
from pgolf_core.model.spec import spec_from_stack
from pgolf.plugins.attention.partial_rope import PartialRope, PartialRopeParams
from pgolf.plugins.attention.value_embedding import ValueEmbedding
from pgolf.plugins.attention.xsa import XSA, XSAParams
from pgolf.plugins.evaluator.full_val import FullVal, FullValParams
from pgolf.plugins.init.orthogonal import OrthogonalInitParams, build as build_orthogonal
from pgolf.plugins.residual.catalytic import Catalytic
from pgolf.plugins.residual.ln_scale import LnScale, ScaleBy


@pytest.fixture
def spec(registry):
    return spec_from_stack(tiny_stack(registry), registry)


def _installed(spec, slot, site):
    return [[key for key, _, _ in getattr(layer, slot).installs.get(site, [])] for layer in spec.layers]


def test_ln_scale_installs_one_over_sqrt_layer_plus_one_at_both_branch_inputs(spec):
    LnScale().transform(spec, [0, 3], name=ModifierName(0, "ln_scale"))
    # layer 0's factor is 1: nothing installed there
    assert _installed(spec, "residual", "attn_in") == [[], [], [], ["ln_scale"]] == _installed(spec, "residual", "mlp_in")
    factory = spec.layers[3].residual.installs["attn_in"][0][1]
    scale = factory(None)
    assert isinstance(scale, ScaleBy) and scale.factor == pytest.approx(0.5)
    h = torch.randn(2, 3)
    assert torch.equal(scale(h), h * 0.5)


def test_xsa_installs_at_heads_out_of_selected_attention(spec):
    XSA(XSAParams(learnable_gate=True)).transform(spec, [2, 3], name=ModifierName(0, "xsa"))
    assert _installed(spec, "attention", "heads_out") == [[], [], ["xsa"], ["xsa"]]
    module = spec.layers[3].attention.installs["heads_out"][0][1](None)
    assert module.gate is not None and module.gate.item() == pytest.approx(2.0)  # the learnable gate's init logit


def test_partial_rope_replaces_the_rotary_part(spec):
    PartialRope(PartialRopeParams(rope_dims=8, ntk_seq_len=32)).transform(spec, [0], name="m")
    assert set(spec.layers[0].attention.parts) == {"rotary"} and spec.layers[1].attention.parts == {}
    host = type("Host", (), {"head_dim": 16, "rope_base": 500.0})()
    rotary = spec.layers[0].attention.parts["rotary"][0](host)
    assert (rotary.rope_dims, rotary.ntk_seq_len, rotary.base) == (8, 32, 500.0)


def test_catalytic_gates_multiply_the_branch_scales(registry):
    torch.manual_seed(0)
    model, _, _ = tiny_model(registry, extra='[[modifier]]\nuse = "catalytic_residuals"\nlayers = [1]')
    block = model.blocks[1]
    with torch.no_grad():
        block.attn_gain["catalytic_residuals"].gate.fill_(2.0)
        block.mlp_gain["catalytic_residuals"].gate.fill_(3.0)
        block.attn_scale.fill_(0.5)
    x, x0 = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    mixed = block.mix(x, x0)
    h = mixed + (0.5 * 2.0) * block.attn(torch.nn.functional.rms_norm(mixed, (64,)))
    h = h + 3.0 * block.mlp(torch.nn.functional.rms_norm(h, (64,)))
    torch.testing.assert_close(block(x, x0), h)
    assert model.blocks[0].attn_gain is None and model.blocks[0].mlp_gain is None


def test_catalytic_modifier_installs_at_the_gain_sites(spec):
    Catalytic().transform(spec, [1], name=ModifierName(0, "catalytic_residuals"))
    assert _installed(spec, "residual", "attn_gain") == [[], ["catalytic_residuals"], [], []] == _installed(spec, "residual", "mlp_gain")


def test_value_embedding_output_and_per_layer_scales():
    torch.manual_seed(0)
    ve = ValueEmbedding(10, 4, 8, [1, 3], init_std=0.01, scale_init=0.1)
    nn.init.normal_(ve.proj.weight)
    with torch.no_grad():
        ve.ve_layer_scales[1].fill_(2.0)
    ids = torch.tensor([[1, 2, 3]])
    base = 0.1 * (ve.embed(ids) @ ve.proj.weight.T)
    aux = ve.aux(ids)
    torch.testing.assert_close(aux["ve_1"], base)
    torch.testing.assert_close(aux["ve_3"], 2.0 * base)
    assert ve.embed.weight.std().item() == pytest.approx(0.01, rel=0.5)


def test_orthogonal_init_rules(registry):
    stack = tiny_stack(registry, "model.model_dim=256", "model.num_heads=4", "model.num_kv_heads=4", path=STACKS / "pr315.toml")
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    bigram = model.embedding.lookup["bigram_hash"]
    with torch.no_grad():
        bigram.proj.weight.zero_()
    build_orthogonal(OrthogonalInitParams(), type("C", (), {"model": stack.model})())(model)
    w = model.blocks[0].attn.c_q.weight
    torch.testing.assert_close(w @ w.T, torch.eye(256), atol=1e-4, rtol=0)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0  # zero-init wins over orthogonal
    # bigram.proj (256 x 128) is a '.proj' outside the zero-init blocks: orthogonal columns / sqrt(2 L)
    p = bigram.proj.weight
    torch.testing.assert_close(p.T @ p, torch.eye(128) / (2 * stack.model.num_layers), atol=1e-4, rtol=0)
    assert model.token_embedding().std().item() == pytest.approx(0.005, rel=0.1)


def test_full_val_evaluator_labels_and_scores_like_eval_val(registry):
    torch.manual_seed(0)
    model, _ = build_model(tiny_stack(registry), registry)
    tokens = torch.randint(1, 1024, (4 * 16 + 1,))
    val = ValData(tokens, TableBytes(torch.ones(1024, dtype=torch.int16)))
    env = EvalEnv(val, 16, 64, 1, 0, 1, torch.device("cpu"))
    ((name, loss, bpb, ms, note),) = [dataclasses.astuple(r) for r in FullVal(FullValParams(), 16).evaluate(model, env, "int8", "zlib")]
    assert name == "final_int8_zlib_roundtrip" and (loss, bpb) == pytest.approx(eval_val(model, env)) and ms >= 0
    assert bpb == pytest.approx(loss / math.log(2))  # one byte per token in this table


def test_every_builtin_technique_module_is_imported_by_a_test(registry):
    text = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    modules = sorted({r.module for r in registry.all() if r.distribution == "pgolf"})
    untested = [m for m in modules if not re.search(rf"(from|import) {re.escape(m)}\b", text)]
    assert not untested, f"built-in techniques without a test importing them: {untested}"


def test_partial_rope_rejects_odd_or_oversized_dims(spec):
    for dims in (7, 18):
        with pytest.raises(ValueError, match=f"rope_dims={dims} must be even and <= head dim 16"):
            PartialRope(PartialRopeParams(rope_dims=dims)).transform(spec, [0], name="m")
    with pytest.raises(ConfigError, match="both replace 'rotary'"):
        PartialRope(PartialRopeParams(rope_dims=8)).transform(spec, [0, 0], name="m")
