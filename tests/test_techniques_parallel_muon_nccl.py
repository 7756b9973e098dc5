"""Parallel Muon's NCCL branch, driven on CPU: the reduce-scatter / all-gather path that runs on GPUs.

On gloo the optimizer averages each bank with an all-reduce and keeps this rank's rows; on NCCL it reduce-scatters
the bank (each rank receives only its shard of the average) and averages the replicated gradients with
``ReduceOp.AVG``. Two gloo processes run the same steps twice: once as they are, and once with the plugin's view of
``torch.distributed`` reporting the NCCL backend and NCCL's collectives built from gloo ones with the gloo
branch's own arithmetic (sum, then divide by the world size). The updates must be bitwise identical, so any
difference is in the branch's own code: padding, which rows a rank owns, the order of the waits, the gathers."""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


class NcclOnGloo(types.SimpleNamespace):
    """``torch.distributed`` as the plugin sees it on NCCL: ``get_backend()`` says "nccl", and the calls only
    NCCL's branch makes (``reduce_scatter_tensor``, ``all_reduce`` with AVG) run on gloo, summing and dividing
    as the gloo branch does. Counts what was called."""

    def __init__(self) -> None:
        super().__init__(calls={"reduce_scatter_tensor": 0, "all_gather_into_tensor": 0, "all_reduce_avg": 0, "bank_all_reduce": 0})

    def __getattr__(self, name):
        return getattr(dist, name)

    def get_backend(self, group=None):
        return "nccl"

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, async_op=False):
        if op == dist.ReduceOp.AVG:
            self.calls["all_reduce_avg"] += 1
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)
            if async_op:
                return _Then(work, lambda: tensor.div_(dist.get_world_size()))
            tensor.div_(dist.get_world_size())
            return None
        if tensor.dtype == torch.bfloat16 and tensor.dim() == 3:  # a whole bank: the gloo branch's all-reduce
            self.calls["bank_all_reduce"] += 1
        return dist.all_reduce(tensor, op=op, async_op=async_op)

    def reduce_scatter_tensor(self, output, input, op=dist.ReduceOp.SUM, async_op=False):
        assert op == dist.ReduceOp.AVG and input.shape[0] == output.shape[0] * dist.get_world_size()
        self.calls["reduce_scatter_tensor"] += 1
        full, rank, rows = input.clone(), dist.get_rank(), output.shape[0]
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)

        def finish():
            full.div_(dist.get_world_size())
            output.copy_(full[rank * rows : (rank + 1) * rows])

        if not async_op:
            work.wait()
            finish()
            return None
        return _Then(work, finish)

    def all_gather_into_tensor(self, output, input, async_op=False):
        self.calls["all_gather_into_tensor"] += 1
        return dist.all_gather_into_tensor(output, input, async_op=async_op)


class _Then:
    def __init__(self, work, then) -> None:
        self.work, self.then = work, then

    def wait(self) -> None:
        self.work.wait()
        self.then()


def _run(rank: int, use_nccl_branch: bool) -> tuple[list[torch.Tensor], dict[str, int] | None]:
    """Three steps of the Parallel Muon set over banks that pad unevenly on 2 ranks (5, 3 and 1 matrices; rank 1
    owns only padding of the last), wide and tall matrices, and replicated tensors; every rank has its own
    gradients."""
    from pgolf.plugins.optimizer import parallel_muon as pm

    shim = NcclOnGloo() if use_nccl_branch else None
    saved = pm.dist
    pm.dist = shim or dist
    try:
        gen = torch.Generator().manual_seed(0)
        banks = [[torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(n)] for n, shape in ((5, (8, 16)), (3, (24, 8)), (1, (8, 8)))]
        scalars = [torch.nn.Parameter(torch.randn(8, generator=gen)), torch.nn.Parameter(torch.randn(3, 4, generator=gen))]
        model = torch.nn.ParameterList([p for bank in banks for p in bank] + scalars)
        params = pm.ParallelMuonParams(momentum_warmup_steps=2, row_equilibrate="bf16", weight_decay=0.04, grad_clip_norm=0.3)
        muon = pm.BankedMuon(banks, lr=0.02, momentum=params.momentum, backend_steps=5, weight_decay=params.weight_decay, row_equilibrate="bf16")
        adam = torch.optim.AdamW([{"params": scalars, "lr": 0.02}], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.04)
        opt = pm.ParallelMuonSet(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0), muon, adam, None, scalars, params)
        grads = torch.Generator().manual_seed(100 + rank)
        for step in range(STEPS):
            opt.before_step(step)
            for p in model:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step(model)
        return [p.detach().clone() for p in model], (shim.calls if shim else None)
    finally:
        pm.dist = saved


def _worker(rank: int, init_file: str, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        gloo, _ = _run(rank, use_nccl_branch=False)
        nccl, calls = _run(rank, use_nccl_branch=True)
        # Each step: one reduce-scatter and one all-gather per bank, the replicated gradients averaged with AVG;
        # no bank through the gloo branch's all-reduce.
        assert calls["reduce_scatter_tensor"] == calls["all_gather_into_tensor"] == 3 * STEPS, calls
        assert calls["all_reduce_avg"] > 0 and calls["bank_all_reduce"] == 0, calls
        for i, (a, b) in enumerate(zip(gloo, nccl, strict=True)):
            assert torch.equal(a, b), f"rank {rank}: parameter {i} differs by {(a - b).abs().max().item()}"
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, [t.double().sum().item() for t in nccl])
        assert all(s == everyone[0] for s in everyone)  # the gathers left every rank with the same weights
        torch.save(nccl, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nccl_branch_gives_the_gloo_branchs_updates(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), tmp_path), nprocs=WORLD, join=True)  # a worker's failure raises here
    weights = torch.load(tmp_path / "rank0.pt")
    assert len(weights) == 11 and all(torch.isfinite(w).all() for w in weights)
