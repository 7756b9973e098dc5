"""PR #1289's two-lane parallel blocks (``two_lane_parallel``): block math, the lanes through the U-Net, the
parts it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import STACKS, tiny_stack
from pgolf_core.errors import ConfigError
from pgolf_core.model.gpt import build_model
from pgolf_core.model.sites import Site
from pgolf.plugins.residual.ln_scale import ScaleBy
from pgolf.plugins.residual.resid_mix import ResidMixBlock
from pgolf.plugins.residual.two_lane import LaneWiring, TwoLaneDecoder, _from_start_layer


def _random_(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.ndim <= 1 else 0.0))


def test_two_lane_block_routes_both_deltas_from_the_raw_lanes():
    torch.manual_seed(0)
    attn, mlp = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    block = ResidMixBlock(8, attn, mlp)
    block.wiring = wiring = LaneWiring(8, (0.9, 0.2, 0.3, 1.1))  # what the modifier puts at the block's wiring part
    block.attn_in, block.mlp_in = Site({"ln_scale": ScaleBy(0.7)}), Site({"ln_scale": ScaleBy(0.7)})
    torch.testing.assert_close(wiring.route.detach(), torch.tensor([0.9, 0.2, 0.3, 1.1]))
    torch.testing.assert_close(wiring.resid_mix_mlp.detach(), torch.stack((torch.ones(8), torch.zeros(8))))
    _random_(block)
    with torch.no_grad():
        wiring.route.copy_(torch.tensor([0.9, 0.2, 0.3, 1.1]))
    x_a, x_m, x0 = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rm, rmm = block.resid_mix.detach(), wiring.resid_mix_mlp.detach()
    d_a = block.attn_scale * attn(F.rms_norm(rm[0] * x_a + rm[1] * x0, (8,)) * 0.7)
    d_m = block.mlp_scale * mlp(F.rms_norm(rmm[0] * x_m + rmm[1] * x0, (8,)) * 0.7)
    out_a, out_m = wiring.lanes(block, x_a, x_m, x0, None)
    torch.testing.assert_close(out_a, x_a + 0.9 * d_a + 0.3 * d_m)  # the base is the raw lane, not the mix
    torch.testing.assert_close(out_m, x_m + 0.2 * d_a + 1.1 * d_m)
    # The single-stream path of the same block is untouched by the lane parameters.
    h = rm[0] * x_a + rm[1] * x0
    h = h + block.attn_scale * attn(F.rms_norm(h, (8,)) * 0.7)
    torch.testing.assert_close(block(x_a, x0), h + block.mlp_scale * mlp(F.rms_norm(h, (8,)) * 0.7))


def _two_lane_stack(registry, *extra: str):
    sets = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=6",
            "modifier[1].rope_dims=8", "modifier[4].layers=[4, 5]", "modifier[5].layers=[1]",
            'modifier[6].use="two_lane_parallel"', 'modifier[6].layers="4:"']
    return tiny_stack(registry, *sets, *extra, path=STACKS / "pr1392.toml")


def _reference_hidden(model, ids):
    """PR #1289's ``_run_layers`` transcribed: both lanes through encoder and decoder, then the merge."""
    x = model.embedding(ids)
    aux: dict = {}
    for name in model.aux_providers:
        aux.update(getattr(model, name).aux(ids))
    topo, x0 = model.topology, x
    x_a = x_m = x
    skips = []

    def two_lane(b):
        return isinstance(b.wiring, LaneWiring)

    def run(i, x_a, x_m):
        b = model.blocks[i]
        if not two_lane(b):
            out = b(x_a, x0, aux)
            return out, out
        s, r = 1.0 / (i + 1) ** 0.5, b.wiring.route  # LN scale on every layer, as in the stack
        u_a = b.resid_mix[0] * x_a + b.resid_mix[1] * x0
        d_a = b.attn_scale * b.attn(F.rms_norm(u_a, (u_a.size(-1),)) * s, aux)
        u_m = b.wiring.resid_mix_mlp[0] * x_m + b.wiring.resid_mix_mlp[1] * x0
        d_m = b.mlp_scale * b.mlp(F.rms_norm(u_m, (u_m.size(-1),)) * s)
        return x_a + r[0] * d_a + r[2] * d_m, x_m + r[1] * d_a + r[3] * d_m

    for i in range(topo.num_encoder_layers):
        x_a, x_m = run(i, x_a, x_m)
        skips.append(x_a)
    for j in range(topo.num_decoder_layers):
        bi = topo.num_encoder_layers + j
        if skips:
            skip = topo.skip_weights[j] * skips.pop()
            x_a = x_a + skip
            if two_lane(model.blocks[bi]):
                x_m = x_m + skip
        x_a, x_m = run(bi, x_a, x_m)
    m = topo.decoder.lane_merge
    return model.final_norm(m * x_a + (1 - m) * x_m)


def test_lanes_run_through_the_unet_and_merge_like_pr1289(registry):
    stack = _two_lane_stack(registry)
    torch.manual_seed(0)
    model, _ = build_model(stack, registry)
    assert [isinstance(b.wiring, LaneWiring) for b in model.blocks] == [False] * 4 + [True] * 2
    decoder = model.topology.decoder
    assert isinstance(decoder, TwoLaneDecoder) and decoder.lane_merge.item() == 0.5 and decoder.layers == (4, 5)
    names = [n for n, _ in model.named_parameters()]
    assert {"blocks.4.wiring.resid_mix_mlp", "blocks.4.wiring.route", "topology.decoder.lane_merge"} <= set(names)
    _random_(model, seed=1)
    with torch.no_grad():
        decoder.lane_merge.fill_(0.3)
    ids = torch.randint(0, stack.model.vocab_size, (2, 16))
    got = model.hidden(ids)
    torch.testing.assert_close(got, _reference_hidden(model, ids), rtol=1e-5, atol=1e-5)
    # The lanes really diverge: a different merge weight changes the output.
    with torch.no_grad():
        decoder.lane_merge.fill_(0.8)
    assert (model.hidden(ids) - got).abs().max() > 1e-3


def test_lane_parameters_train_with_scalar_adam(registry):
    stack = _two_lane_stack(registry)
    model, _ = build_model(stack, registry)
    opt = registry.get("optimizer", "parallel_muon").technique.build(stack.params("optimizer"), type("C", (), {"model": stack.model})())
    oset = opt(model, type("R", (), {"compile": False})())
    lanes = [model.topology.decoder.lane_merge] + [p for b in model.blocks if isinstance(b.wiring, LaneWiring) for p in (b.wiring.route, b.wiring.resid_mix_mlp)]
    scalar_ids = {id(p) for g in oset.adam_scalar.param_groups for p in g["params"]}
    assert len(lanes) == 5 and all(id(p) in scalar_ids for p in lanes)


def test_two_lane_selection_errors_name_the_layers(registry):
    from pgolf_core.model.spec import spec_from_stack
    from pgolf.plugins.residual.parallel import ParallelResidual
    from pgolf.plugins.residual.two_lane import TwoLaneParallel, TwoLaneParams

    with pytest.raises(ConfigError, match=r"layers \[2\] are in the encoder \(layers 0-2\).*select decoder layers \(3:\)"):
        build_model(_two_lane_stack(registry, 'modifier[6].layers="2:"'), registry)
    spec = spec_from_stack(tiny_stack(registry), registry)  # 4 layers: decoder 2, 3
    TwoLaneParallel(TwoLaneParams()).transform(spec, [2, 3], name="lanes")
    with pytest.raises(ConfigError, match=r"modifiers 'lanes' and 'single' both replace 'wiring' on layer 3 residual"):
        ParallelResidual().transform(spec, [3], name="single")
    with pytest.raises(ValueError, match="route_init must have 4 values"):
        TwoLaneParams(route_init=(1.0, 1.0))
    assert _from_start_layer("7") == "7:" and _from_start_layer("0") == [] and _from_start_layer("-1") == []
