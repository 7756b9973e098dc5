"""The spec-level techniques (modifiers that set options) and the remaining built-ins, one by one, plus the
rule that every built-in technique has a test that imports its module."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import STACKS, tiny_stack
from pgolf_core.errors import ConfigError
from pgolf_core.evaluate import EvalEnv, ValData, eval_val
from pgolf_core.model.gpt import build_model
from pgolf_core.model.spec import spec_from_stack
from pgolf.plugins.attention.partial_rope import PartialRope, PartialRopeParams
from pgolf.plugins.attention.value_embedding import ValueEmbedding
from pgolf.plugins.attention.xsa import XSA, XSAParams
from pgolf.plugins.evaluator.full_val import FullVal, FullValParams
from pgolf.plugins.init.orthogonal import OrthogonalInitParams, build as build_orthogonal
from pgolf.plugins.residual.catalytic import Catalytic
from pgolf.plugins.residual.ln_scale import LnScale
from pgolf.plugins.residual.resid_mix import ResidMixBlock


@pytest.fixture
def spec(registry):
    return spec_from_stack(tiny_stack(registry), registry)


def test_ln_scale_claims_one_over_sqrt_layer_plus_one(spec):
    LnScale().transform(spec, [0, 3], name="m")
    assert [layer.residual.options.get("ln_scale") for layer in spec.layers] == [1.0, None, None, pytest.approx(0.5)]


def test_xsa_claims_its_params_on_selected_attention(spec):
    XSA(XSAParams(learnable_gate=True)).transform(spec, [2, 3], name="m")
    assert [bool(layer.attention.options) for layer in spec.layers] == [False, False, True, True]
    assert spec.layers[3].attention.options["xsa"].learnable_gate


def test_partial_rope_validates_dims_against_the_head(spec):
    PartialRope(PartialRopeParams(rope_dims=8, ntk_seq_len=32)).transform(spec, [0], name="m")
    assert spec.layers[0].attention.options["rope"] == (8, 32)
    assert spec.layers[1].attention.options == {}


def test_catalytic_gates_multiply_the_branch_scales():
    torch.manual_seed(0)
    attn, mlp = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    block = ResidMixBlock(4, attn, mlp, catalytic=True)
    with torch.no_grad():
        block.attn_gate.fill_(2.0)
        block.mlp_gate.fill_(3.0)
        block.attn_scale.fill_(0.5)
    x, x0 = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    h = x + (0.5 * 2.0) * attn(torch.nn.functional.rms_norm(x, (4,)))
    h = h + 3.0 * mlp(torch.nn.functional.rms_norm(h, (4,)))
    torch.testing.assert_close(block(x, x0), h)
    names = [n for n, _ in block.named_parameters()]
    assert names.index("attn_gate") > names.index("mlp_scale") and names.index("mlp_gate") < names.index("resid_mix")


def test_catalytic_modifier_marks_residual_blocks(spec):
    Catalytic().transform(spec, [1], name="m")
    assert [layer.residual.options.get("catalytic", False) for layer in spec.layers] == [False, True, False, False]


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
    with torch.no_grad():
        model.embedding.bigram.proj.weight.zero_()
    build_orthogonal(OrthogonalInitParams(), type("C", (), {"model": stack.model})())(model)
    w = model.blocks[0].attn.c_q.weight
    torch.testing.assert_close(w @ w.T, torch.eye(256), atol=1e-4, rtol=0)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0  # zero-init wins over orthogonal
    # bigram.proj (256 x 128) is a '.proj' outside the zero-init blocks: orthogonal columns / sqrt(2 L)
    p = model.embedding.bigram.proj.weight
    torch.testing.assert_close(p.T @ p, torch.eye(128) / (2 * stack.model.num_layers), atol=1e-4, rtol=0)
    assert model.token_embedding().std().item() == pytest.approx(0.005, rel=0.1)


def test_full_val_evaluator_labels_and_scores_like_eval_val(registry):
    torch.manual_seed(0)
    model, _ = build_model(tiny_stack(registry), registry)
    tokens = torch.randint(1, 1024, (4 * 16 + 1,))
    val = ValData(tokens, torch.ones(1024, dtype=torch.int16), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    env = EvalEnv(val, 16, 64, 1, 0, 1, torch.device("cpu"))
    ((name, loss, bpb, ms, note),) = FullVal(FullValParams()).evaluate(model, env, "int8", "zlib")
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
    with pytest.raises(ConfigError, match="both set 'rope'"):
        PartialRope(PartialRopeParams(rope_dims=8)).transform(spec, [0, 0], name="m")
