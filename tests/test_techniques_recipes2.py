"""Techniques of the #1019 / #1392 / #1319 line: banked init, Parallel Muon, MuonEq-R, depth recurrence,
parallel blocks, LeakyReLU², focal loss, sqrt warmdown, shadow SWA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import STACKS, tiny_stack
from pgolf_core.contracts import FinalEvalAware
from pgolf_core.model.gpt import build_model, sequential_view
from pgolf_core.model.layers import CastedLinear, deferred_init
from pgolf.plugins.averaging.ema import EMA, EMAParams
from pgolf.plugins.head.softcap import SoftcapHead
from pgolf.plugins.loss.focal import FocalLoss
from pgolf.plugins.init.banked import BankedOrthogonalInit
from pgolf.plugins.mlp.relu2 import Relu2MLP
from pgolf.plugins.optimizer.muon import equilibrate_rows, zeropower_via_newtonschulz5
from pgolf.plugins.optimizer.parallel_muon import BankedMuon, group_banks, zeropower_batched
from pgolf.plugins.residual.parallel import ParallelResidual, ParallelWiring, _from_start_layer
from pgolf.plugins.schedule.linear_warmdown import LinearWarmdown, LinearWarmdownParams
from pgolf.plugins.topology.recurrence import Recurrence, RecurrenceSchedule


def _tiny(registry, stack: str, *extra: str):
    sets = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=4",
            "modifier[4].layers=[2, 3]", "modifier[1].rope_dims=8"]
    if stack == "pr1392":
        sets = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=4",
                "modifier[1].rope_dims=8", "modifier[4].layers=[2, 3]", "modifier[5].layers=[1, 2]", 'modifier[6].layers="2:"']
    return tiny_stack(registry, *sets, *extra, path=STACKS / f"{stack}.toml")


def test_deferred_init_draws_nothing():
    torch.manual_seed(0)
    with deferred_init():
        CastedLinear(8, 8, bias=False)
    after_deferred = torch.rand(1)
    torch.manual_seed(0)
    after_nothing = torch.rand(1)
    assert torch.equal(after_deferred, after_nothing)
    torch.manual_seed(0)
    CastedLinear(8, 8, bias=False)
    assert not torch.equal(torch.rand(1), after_nothing)  # a normal build consumes the RNG


def test_banked_init_draws_in_bank_order(registry):
    stack = _tiny(registry, "pr1392")
    torch.manual_seed(7)
    model, _ = build_model(stack, registry)
    n = stack.model.num_layers
    # Replay the banks' draws: after the token embedding's constructor draw (and the VE table's), the init
    # draws tok normal, then per layer q, k, v, up orthogonal; out and down are zero.
    for i in range(n):
        blk = model.blocks[i]
        assert blk.attn.proj.weight.abs().sum() == 0 and blk.mlp.proj.weight.abs().sum() == 0
        q = blk.attn.c_q.weight
        torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0]), atol=1e-4, rtol=0)
    torch.manual_seed(7)
    tok = torch.nn.Embedding(stack.model.vocab_size, 64)  # constructor draw
    ve = torch.nn.Embedding(stack.model.vocab_size, 128)
    torch.nn.init.normal_(ve.weight, std=0.01)
    torch.nn.Linear(128, 32, bias=False)  # ve proj constructor draw
    torch.nn.init.normal_(tok.weight, std=0.005)
    q0 = torch.empty(64, 64)
    torch.nn.init.orthogonal_(q0)
    torch.testing.assert_close(model.blocks[0].attn.c_q.weight, q0, atol=0, rtol=0)
    assert BankedOrthogonalInit.writes_block_weights


def test_batched_newton_schulz_matches_per_matrix():
    torch.manual_seed(0)
    g = torch.randn(3, 16, 8)
    batched = zeropower_batched(g, 5)
    for i in range(3):
        torch.testing.assert_close(batched[i].float(), zeropower_via_newtonschulz5(g[i], 5).float(), atol=5e-2, rtol=0)  # bf16 rounding
    s = torch.linalg.svdvals(batched[0].float())
    assert 0.5 < s.min() and s.max() < 1.3  # orthogonalised


def test_muon_eq_r_rows_have_unit_norm():
    torch.manual_seed(0)
    u = torch.randn(5, 7) * torch.arange(1, 6)[:, None]
    for mode in ("fp32", "bf16"):
        out = equilibrate_rows(u, mode)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(5), atol=1e-4, rtol=0)
    assert torch.equal(equilibrate_rows(u, "off"), u)
    tiny = torch.zeros(1, 3)
    assert torch.isfinite(equilibrate_rows(tiny, "fp32")).all()


def test_banked_muon_step_is_the_records_update():
    torch.manual_seed(0)
    bank = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    before = [p.detach().clone() for p in bank]
    for p in bank:
        p.grad = torch.randn(8, 4)
    opt = BankedMuon([bank], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5)
    opt.step()
    g = torch.stack([p.grad for p in bank]).bfloat16()
    buf = g.clone()
    upd = zeropower_batched(g.add(buf, alpha=0.9), 5)
    scale = math.sqrt(8 / 4)
    for i, p in enumerate(bank):
        expected = before[i] * (1 - 0.1 * 0.5) - 0.1 * scale * upd[i].float()
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    assert opt.state[bank[0]]["shard_momentum"].dtype == torch.bfloat16  # bf16 momentum, as the records


def test_banked_muon_keeps_bf16_momentum_through_a_state_dict_round_trip():
    torch.manual_seed(0)
    bank = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    opt = BankedMuon([bank], lr=0.02, momentum=0.95, backend_steps=5, weight_decay=0.0)
    for p in bank:
        p.grad = torch.randn(8, 4)
    opt.step()
    saved = opt.state_dict()
    fresh = BankedMuon([bank], lr=0.02, momentum=0.95, backend_steps=5, weight_decay=0.0)
    fresh.load_state_dict(saved)  # torch would cast it to the parameters' fp32: a resumed run would drift
    (state,) = fresh.state.values()
    assert state["shard_momentum"].dtype == torch.bfloat16
    assert torch.equal(state["shard_momentum"], opt.state[bank[0]]["shard_momentum"])


def test_parallel_muon_groups_four_banks_and_skips_untrained(registry):
    stack = _tiny(registry, "pr1392")
    model, _ = build_model(stack, registry)
    banks, _ = group_banks(model)
    assert [len(b) for b in banks] == [8, 8, 4, 4]  # qo, kv (q+out, k+v per layer), up, down
    opt = registry.get("optimizer", "parallel_muon").technique.build(stack.params("optimizer"), type("C", (), {"model": stack.model})())
    runtime = type("R", (), {"compile": False})()
    oset = opt(model, runtime)
    assert oset.syncs_gradients
    grouped = {id(p) for o in oset.optimizers for g in o.param_groups for p in g["params"]}
    assert all(id(s) not in grouped for s in model.topology.schedule.scales)
    named = dict(model.named_parameters())
    scalar_ids = {id(p) for p in oset.adam_scalar.param_groups[0]["params"]}
    assert id(named["ve_shared.proj.weight"]) in scalar_ids  # small matrices outside the blocks: AdamW


def test_recurrence_repeats_encoder_layer_after_its_skip_and_switches_at_start(registry):
    stack = _tiny(registry, "pr1392", "modifier[5].start_step=3")
    torch.manual_seed(0)
    model, mods = build_model(stack, registry)
    rec = next(m for m in mods if isinstance(m, Recurrence))
    sched = model.topology.schedule  # the topology's layer schedule is the technique's part
    assert isinstance(sched, RecurrenceSchedule) and sched.layers == (1, 2) and not sched.active
    assert sched.repeats == {1}  # encoder_only: the decoder layer 2 is listed but never repeats
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        for blk in model.blocks:  # the zero-initialised output projections would make every block the identity
            torch.nn.init.normal_(blk.attn.proj.weight, std=0.1)
            torch.nn.init.normal_(blk.mlp.proj.weight, std=0.1)
        base = model.logits(ids)
        sched.active = True
        on = model.logits(ids)
        sched.active = False
    assert not torch.allclose(base, on)
    calls = []
    hook = model.blocks[1].register_forward_hook(lambda m, i, o: calls.append(1))
    hook2 = model.blocks[2].register_forward_hook(lambda m, i, o: calls.append(2))
    sched.active = True
    with torch.no_grad():
        model.logits(ids)
    hook.remove(), hook2.remove()
    assert calls == [1, 1, 2]  # layer 1 (encoder) twice, layer 2 (decoder) once: encoder_only as ran
    sched.active = False
    state = type("S", (), {"step": 3, "log": lambda self, m: logs.append(m)})()
    logs: list[str] = []
    state.log = logs.append
    rec.on_step_start(state)
    assert sched.active and logs == ["depth_recurrence:enabled step:3 layers:1,2"]
    assert rec.state_dict()["active"] is True
    parallel = next(m for m in mods if isinstance(m, ParallelResidual))
    with sequential_view(mods):
        assert not sched.active and all(b.wiring is None for b in model.blocks)
    assert sched.active and isinstance(model.blocks[3].wiring, ParallelWiring)
    assert [b for b in model.blocks if isinstance(b.wiring, ParallelWiring)] == parallel.blocks and parallel.blocks
    assert all(s.detach().eq(0.5).all() for s in sched.scales)


def test_parallel_block_reads_the_same_input_for_both_branches():
    from pgolf.plugins.residual.resid_mix import ResidMixBlock

    torch.manual_seed(0)
    attn = torch.nn.Linear(8, 8, bias=False)
    mlp = torch.nn.Linear(8, 8, bias=False)
    block = ResidMixBlock(8, attn, mlp)
    block.wiring = ParallelWiring()
    x, x0 = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    norm = F.rms_norm(x, (8,))
    torch.testing.assert_close(block(x, x0), x + attn(norm) + mlp(norm))
    block.wiring = None
    h = x + attn(norm)
    torch.testing.assert_close(block(x, x0), h + mlp(F.rms_norm(h, (8,))))
    assert _from_start_layer("7") == "7:" and _from_start_layer("-1") == []


def test_parallel_residual_replaces_the_wiring_of_its_layers(registry):
    from pgolf_core.model.spec import spec_from_stack

    spec = spec_from_stack(tiny_stack(registry), registry)
    ParallelResidual().transform(spec, [2, 3], name="m")
    assert "wiring" in spec.layers[2].residual.parts and spec.layers[1].residual.parts == {}


def test_leaky_relu_squared_mlp():
    torch.manual_seed(0)
    mlp = Relu2MLP(4, 8, negative_slope=0.5)
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(2, 4)
    torch.testing.assert_close(mlp(x), mlp.proj(F.leaky_relu(mlp.fc(x), 0.5).square()))
    relu = Relu2MLP(4, 8)
    relu.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(relu(x), relu.proj(torch.relu(relu.fc(x)).square()))


def test_focal_loss_in_training_and_plain_ce_after_prepare_final_eval():
    torch.manual_seed(0)
    head = SoftcapHead(4, 10, True, 30.0)
    loss = FocalLoss(gamma=1.0, in_eval=True)
    x, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.randint(0, 10, (6,))
    logits = head.logits(x, w).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    focal = ((1 - torch.exp(-ce)) * ce).mean()
    torch.testing.assert_close(loss(logits, y), focal)
    loss.eval()
    torch.testing.assert_close(loss(logits, y), focal)  # as ran: validation also focal
    assert isinstance(loss, FinalEvalAware)
    loss.prepare_final_eval()
    torch.testing.assert_close(loss(logits, y), ce.mean())
    loss.train()
    torch.testing.assert_close(loss(logits, y), focal)
    torch.testing.assert_close(FocalLoss(gamma=0.0, in_eval=True)(logits, y), ce.mean())  # gamma 0: plain CE


def test_sqrt_warmdown_shape():
    lin = LinearWarmdown(LinearWarmdownParams(warmdown_iters=10), iterations=20, max_wallclock_seconds=0)
    sq = LinearWarmdown(LinearWarmdownParams(warmdown_iters=10, shape="sqrt"), iterations=20, max_wallclock_seconds=0)
    assert lin.lr_mul(15, 0) == pytest.approx(0.5) and sq.lr_mul(15, 0) == pytest.approx(1 - math.sqrt(0.5))
    assert sq.lr_mul(5, 0) == 1.0 and sq.lr_mul(19, 0) == pytest.approx(1 - math.sqrt(0.9))
    assert all(sq.lr_mul(s, 0) <= lin.lr_mul(s, 0) for s in range(20))


def test_shadow_swa_sums_and_is_never_applied():
    ema = EMA(EMAParams(decay=0.5, shadow_swa_every=2, shadow_swa_start_scale=0.2))
    model = torch.nn.Linear(2, 2, bias=False)
    logs: list[str] = []
    state = type("S", (), {})()
    state.model, state.log = model, logs.append
    ema.on_train_start(state)
    for step, scale in ((1, 0.5), (2, 0.5), (3, 0.1), (4, 0.1), (6, 0.1)):
        with torch.no_grad():
            model.weight.add_(1.0)
        state.step, state.lr_scale = step, scale
        ema.after_optimizer_step(state)
    assert logs == ["swa:start step:4"] and ema.shadow_count == 2
    exported = ema.export_weights(model)["weight"]
    torch.testing.assert_close(exported, ema.state["weight"])  # the EMA, not the SWA sum
