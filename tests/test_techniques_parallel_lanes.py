"""Records #1334/#1477's split lanes (``parallel_lanes``): the lane step and the decoder against transcriptions of
the records' ``forward_attn``/``forward_mlp`` and ``forward_logits``, learned routes, errors, and a tiny stack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import STACKS, tiny_stack
from pgolf_core.errors import ConfigError
from pgolf_core.model.gpt import build_model
from pgolf_core.model.roles import CONTROL
from pgolf_core.model.sites import Site
from pgolf.plugins.residual.ln_scale import ScaleBy
from pgolf.plugins.residual.parallel_lanes import LaneDecoder, ParallelLanesParams, _from_start_layer
from pgolf.plugins.residual.resid_mix import ResidMixBlock


def _random_(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.ndim <= 1 else 0.0))


# #1477's Block.forward_attn / forward_mlp, transcribed (attn_norm and mlp_norm are weightless RMSNorms).
def record_forward_attn(block, x, x0, s, aux=None):
    mix = block.resid_mix.to(dtype=x.dtype)
    x_in = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
    h = F.rms_norm(x_in, (x_in.size(-1),)) * s
    attn_out = block.attn(h, aux) if aux else block.attn(h)
    return x_in + block.attn_scale.to(dtype=x_in.dtype)[None, None, :] * attn_out


def record_forward_mlp(block, x, s):
    return x + block.mlp_scale.to(dtype=x.dtype)[None, None, :] * block.mlp(F.rms_norm(x, (x.size(-1),)) * s)


def _block(seed=0):
    torch.manual_seed(seed)
    attn, mlp = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    block = ResidMixBlock(8, attn, mlp)
    block.attn_in, block.mlp_in = Site({"ln_scale": ScaleBy(0.7)}), Site({"ln_scale": ScaleBy(0.7)})
    _random_(block, seed)
    return block


def test_lane_step_is_the_records_forward_attn_and_forward_mlp_with_no_cross_routes():
    block = _block()
    decoder = LaneDecoder((3,), ParallelLanesParams())
    assert decoder.routes is None and decoder.route_init == (1.0, 0.0, 0.0, 1.0)
    lane0, lane1, x0 = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out0, out1 = decoder.lanes(block, 3, lane0, lane1, x0, None)
    torch.testing.assert_close(out0, record_forward_attn(block, lane0, x0, 0.7), rtol=0, atol=0)  # bit-identical
    torch.testing.assert_close(out1, record_forward_mlp(block, lane1, 0.7), rtol=0, atol=0)
    # no cross routes: the MLP lane does not see lane0 or x0, the attention lane does not see lane1
    assert torch.equal(decoder.lanes(block, 3, lane0 + 1.0, lane1, x0 + 1.0, None)[1], out1)
    assert torch.equal(decoder.lanes(block, 3, lane0, lane1 + 1.0, x0, None)[0], out0)


def test_learned_routes_start_at_route_init_and_mix_both_deltas():
    block = _block(1)
    params = ParallelLanesParams(learn_routes=True, route_init=(0.9, 0.2, 0.3, 1.1))
    decoder = LaneDecoder((2, 3), params)
    assert decoder.routes.shape == (2, 4) and decoder.routes._pgolf_role == CONTROL and decoder.lane_merge._pgolf_role == CONTROL
    torch.testing.assert_close(decoder.routes.detach(), torch.tensor([[0.9, 0.2, 0.3, 1.1]] * 2))
    lane0, lane1, x0 = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rm = block.resid_mix.detach()
    u = rm[0] * lane0 + rm[1] * x0
    d_a = record_forward_attn(block, lane0, x0, 0.7) - u
    d_m = record_forward_mlp(block, lane1, 0.7) - lane1
    out0, out1 = decoder.lanes(block, 3, lane0, lane1, x0, None)
    torch.testing.assert_close(out0, u + 0.9 * d_a + 0.3 * d_m)
    torch.testing.assert_close(out1, lane1 + 0.2 * d_a + 1.1 * d_m)
    # frozen, the same routes give the same numbers without a parameter
    frozen = LaneDecoder((2, 3), ParallelLanesParams(route_init=(0.9, 0.2, 0.3, 1.1)))
    assert frozen.routes is None and [n for n, _ in frozen.named_parameters()] == ["lane_merge"]
    f0, f1 = frozen.lanes(block, 3, lane0, lane1, x0, None)
    torch.testing.assert_close(f0, out0)
    torch.testing.assert_close(f1, out1)


def test_lane_merge_is_a_half_half_blend_at_init():
    decoder = LaneDecoder((0,), ParallelLanesParams())
    assert decoder.lane_merge.item() == 0.5 and decoder.lane_merge.ndim == 0
    m = decoder.lane_merge
    assert (m * torch.tensor(2.0) + (1.0 - m) * torch.tensor(6.0)).item() == 4.0


def _lanes_stack(registry, *extra: str):
    sets = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=6",
            "modifier[1].rope_dims=8", "modifier[4].layers=[4, 5]", "modifier[5].layers=[1]",
            'modifier[6].use="parallel_lanes"', 'modifier[6].layers="4:"']
    return tiny_stack(registry, *sets, *extra, path=STACKS / "pr1392.toml")


def record_hidden(model, ids, variant: str):
    """The decoder of #1477's (``variant="1477"``) or #1334's (``"1334"``) ``forward_logits``, transcribed, on the
    model's own blocks (LN scale 1/sqrt(i+1) on every layer, as the stack has it)."""
    x = model.embedding(ids)
    aux: dict = {}
    for name in model.aux_providers:
        aux.update(getattr(model, name).aux(ids))
    topo, x0, skips = model.topology, x, []
    for i in topo.encoder_blocks():
        x = model.blocks[i](x, x0, aux)
        skips.append(x)
    psl = min(topo.decoder.layers)
    gates = getattr(topo, "skip_gates", None)

    def add_skip(x, skip_idx):
        scaled_skip = topo.skip_weights[skip_idx].to(dtype=x.dtype)[None, None, :] * skips.pop()
        if gates is not None:
            g = torch.sigmoid(gates[skip_idx].to(dtype=x.dtype))[None, None, :]
            return torch.lerp(scaled_skip, x, g)
        return x + scaled_skip

    lane0 = lane1 = None
    for skip_idx, i in enumerate(topo.decoder_blocks()):
        b, s = model.blocks[i], 1.0 / (i + 1) ** 0.5
        if variant == "1477":
            if lane0 is None:
                if skip_idx < topo.num_skips and skips:
                    x = add_skip(x, skip_idx)
                if i >= psl and psl > 0:
                    lane0, lane1 = x, x.clone()
                    lane0, lane1 = record_forward_attn(b, lane0, x0, s, aux), record_forward_mlp(b, lane1, s)
                else:
                    x = model.blocks[i](x, x0, aux)
            else:
                if skip_idx < topo.num_skips and skips:
                    lane0 = add_skip(lane0, skip_idx)
                lane0, lane1 = record_forward_attn(b, lane0, x0, s, aux), record_forward_mlp(b, lane1, s)
        else:  # #1334: the skip goes to x, which nothing reads after the split
            if skips and skip_idx < topo.num_skips:
                x = add_skip(x, skip_idx)
            if i >= psl and lane0 is None:
                lane0 = lane1 = x
            if lane0 is not None:
                lane0, lane1 = record_forward_attn(b, lane0, x0, s, aux), record_forward_mlp(b, lane1, s)
            else:
                x = model.blocks[i](x, x0, aux)
    m = topo.decoder.lane_merge.to(dtype=lane0.dtype)
    return model.final_norm(m * lane0 + (1 - m) * lane1)


@pytest.mark.parametrize("topology", ["unet", "gated_unet"])
@pytest.mark.parametrize("variant,skips", [("1477", "attention_lane"), ("1334", "dropped")])
def test_decoder_matches_the_records_forward_logits(registry, topology, variant, skips):
    stack = _lanes_stack(registry, f'topology.use="{topology}"', f'modifier[6].skips_after_split="{skips}"')
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    decoder = model.topology.decoder
    assert isinstance(decoder, LaneDecoder) and decoder.layers == (4, 5)
    assert {"topology.decoder.lane_merge"} <= {n for n, _ in model.named_parameters()}
    _random_(model, seed=1)
    with torch.no_grad():
        decoder.lane_merge.fill_(0.3)
    ids = torch.randint(0, stack.model.vocab_size, (2, 16))
    got = model.hidden(ids)
    torch.testing.assert_close(got, record_hidden(model, ids, variant), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        decoder.lane_merge.fill_(0.8)
    assert (model.hidden(ids) - got).abs().max() > 1e-3  # the lanes really differ


def test_lane_merge_and_routes_train_with_scalar_adam_and_the_model_trains(registry):
    stack = _lanes_stack(registry, "modifier[6].learn_routes=true")
    model, _ = build_model(stack, registry)
    opt = registry.get("optimizer", "parallel_muon").technique.build(stack.params("optimizer"), type("C", (), {"model": stack.model})())
    oset = opt(model, type("R", (), {"compile": False})())
    scalar_ids = {id(p) for g in oset.adam_scalar.param_groups for p in g["params"]}
    decoder = model.topology.decoder
    assert id(decoder.lane_merge) in scalar_ids and id(decoder.routes) in scalar_ids
    _random_(model, seed=2)  # the zero-initialised output projections would give the attention delta no gradient path
    with torch.no_grad():
        decoder.routes.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0]] * 2))
    ids = torch.randint(0, stack.model.vocab_size, (2, 16))
    model.hidden(ids).square().mean().backward()
    assert decoder.lane_merge.grad is not None and decoder.routes.grad is not None
    assert decoder.routes.grad[:, 1].abs().sum() > 0  # the frozen-zero cross routes get a gradient when learned


def test_selection_errors(registry):
    with pytest.raises(ConfigError, match=r"layers \[4\] are not a suffix.*select \"4:\""):
        build_model(_lanes_stack(registry, "modifier[6].layers=[4]"), registry)
    with pytest.raises(ConfigError, match=r"repeats lane layers \[1\]"):
        build_model(_lanes_stack(registry, 'modifier[6].layers="1:"'), registry)
    from pgolf_core.model.spec import spec_from_stack
    from pgolf.plugins.residual.parallel_lanes import ParallelLanes
    from pgolf.plugins.residual.two_lane import TwoLaneParallel, TwoLaneParams

    spec = spec_from_stack(tiny_stack(registry), registry)  # 4 layers
    ParallelLanes(ParallelLanesParams()).transform(spec, [2, 3], name="lanes")
    with pytest.raises(ConfigError, match=r"modifiers 'lanes' and 'two' both replace 'decoder'"):
        TwoLaneParallel(TwoLaneParams()).transform(spec, [3], name="two")
    with pytest.raises(ValueError, match="route_init must have 4 values"):
        ParallelLanesParams(route_init=(1.0, 0.0))
    assert _from_start_layer("7") == "7:" and _from_start_layer("0") == [] and _from_start_layer("-1") == []
