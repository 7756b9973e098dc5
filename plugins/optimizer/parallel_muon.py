"""Parallel Muon over parameter banks, without DDP (PR #399; kept by PR #549, the #1019 record and PR #1392).

The block matrices are grouped into four banks of same-role matrices, as the records stack them:
``qo`` = every layer's query then every layer's attention output, ``kv`` = keys then values, ``up`` and
``down`` = the MLP's two matrices. Per step, after backward (no DDP: gradients are local):

1. clip the *local* gradients of all parameters to ``grad_clip_norm`` (the records clip before any
   communication);
2. for each bank, largest first: copy its gradients to one bf16 buffer padded to a multiple of the world
   size W and start an asynchronous reduce-scatter (average), so rank r owns ``B_pad/W`` matrices;
3. average the token/scalar gradients (all-reduce) and step both AdamW groups while the scatters fly;
4. for each bank: wait, apply Nesterov momentum (kept in bf16, per shard), optional MuonEq-R row
   equilibration, and a batched 5-step Newton–Schulz to the rank's shard, then start an asynchronous
   all-gather; the previous bank's gathered update is applied while the next one computes:
   ``p ← p·(1 − lr·wd) − lr·sqrt(max(1, rows/cols))·update``.

On one process this is exactly the records' non-distributed path (bf16 momentum per bank, batched NS).
pgolf keeps per-layer parameters and stacks their gradients into the bank buffer (the records copy the bank
gradient to bf16 at the same point), so the model's forward is unchanged. Small matrices outside the blocks
(BigramHash and value-embedding projections) go to the scalar AdamW group, as in the records; parameters
marked frozen (``pgolf_core.model.roles``, e.g. PR #1392's recurrence scales) are in no group.
"""

from __future__ import annotations

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf_core.config.fields import non_negative, one_of, param, positive
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import is_control, is_frozen
from pgolf_core.optim import OptimizerSet
from pgolf_core.registry import Technique
from pgolf.plugins.optimizer.muon import equilibrate_rows

BANK_ROLES = (("qo", (("attn", "c_q"), ("attn", "proj"))), ("kv", (("attn", "c_k"), ("attn", "c_v"))),
              ("up", (("mlp", "fc"),)), ("down", (("mlp", "proj"),)))


@attrs.define(frozen=True, kw_only=True)
class ParallelMuonParams:
    embed_lr: float = param(0.6, help="AdamW LR of an untied token embedding", env="EMBED_LR", validator=non_negative)
    head_lr: float = param(0.008, help="Adam LR of an untied output head", env="HEAD_LR", validator=non_negative)
    tied_embed_lr: float = param(0.035, help="AdamW LR of the tied token embedding and other embedding tables", env="TIED_EMBED_LR", validator=non_negative)
    matrix_lr: float = param(0.025, help="Muon LR of the banks", env="MATRIX_LR", validator=non_negative)
    scalar_lr: float = param(0.025, help="AdamW LR of vectors, control tensors and small matrices outside the blocks", env="SCALAR_LR", validator=non_negative)
    momentum: float = param(0.99, help="Muon momentum after warmup", env="MUON_MOMENTUM", validator=non_negative)
    backend_steps: int = param(5, help="Newton-Schulz iterations", env="MUON_BACKEND_STEPS", validator=positive)
    momentum_warmup_start: float = param(0.92, help="Muon momentum at step 0", env="MUON_MOMENTUM_WARMUP_START")
    momentum_warmup_steps: int = param(1500, help="steps of linear momentum warmup", unit="steps", env="MUON_MOMENTUM_WARMUP_STEPS", validator=non_negative)
    beta1: float = param(0.9, help="AdamW beta1", env="BETA1")
    beta2: float = param(0.95, help="AdamW beta2", env="BETA2")
    adam_eps: float = param(1e-8, help="AdamW epsilon", env="ADAM_EPS", validator=positive)
    grad_clip_norm: float = param(0.3, help="grad-norm clip of the local gradients; 0 disables", env="GRAD_CLIP_NORM", validator=non_negative)
    weight_decay: float = param(0.04, help="Muon decoupled weight decay (scaled by the scheduled lr)", env="MUON_WD", validator=non_negative)
    adam_wd: float = param(0.04, help="AdamW weight decay of the token and scalar groups", env="ADAM_WD", validator=non_negative)
    row_equilibrate: str = param(
        "off",
        help="MuonEq-R before Newton-Schulz: 'bf16' = PR #1392 (rows / sqrt(sum of squares + 1e-7), in bf16), 'fp32' = PR #1319's form",
        env="MUON_EQ_R",
        env_values={"0": "off", "1": "bf16"},
        validator=one_of("off", "fp32", "bf16"),
    )


def zeropower_batched(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Quintic Newton–Schulz on a stack of matrices (B, m, n) at once, in bf16 (PR #399's batched form).

    Eager also in a compiled run, as the #1019 record ("runs eagerly with bmm -- do NOT compile") and PR #1392
    ran it: a compiled version fuses the bf16 element-wise steps and rounds differently."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def _average(t: Tensor, world: int, async_op: bool = False):
    """All-reduce to the mean (gloo has no AVG: sum, then divide)."""
    if dist.get_backend() == "nccl":
        return dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=async_op)
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=async_op)
    if async_op:
        return _DivideOnWait(work, t, world)
    t.div_(world)
    return None


class _DivideOnWait:
    def __init__(self, work, t: Tensor, world: int) -> None:
        self.work, self.t, self.world = work, t, world

    def wait(self) -> None:
        self.work.wait()
        self.t.div_(self.world)


class BankedMuon(torch.optim.Optimizer):
    """Muon whose unit is a bank (a list of same-shaped matrices); one param group per bank."""

    def __init__(self, banks: list[list[nn.Parameter]], lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_equilibrate: str = "off", nesterov: bool = True, zeropower=None) -> None:
        groups = [{"params": bank} for bank in banks]
        super().__init__(groups, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov, weight_decay=weight_decay))
        self.row_equilibrate = row_equilibrate
        self._zeropower = zeropower or zeropower_batched
        # Largest bank first, so its reduce-scatter is launched (and done) first. Stable for equal sizes.
        self.order = sorted(range(len(groups)), key=lambda i: -sum(p.numel() for p in self.param_groups[i]["params"]))
        self._pending: dict[int, tuple[Tensor, object]] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating state to the parameter's dtype on load; the shard momentum lives in bf16 (as in
        the reference), so it is cast back (exactly: it was bf16 when saved) for a resumed run to match."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if "shard_momentum" in st:
                st["shard_momentum"] = st["shard_momentum"].to(torch.bfloat16)

    def _world(self) -> tuple[bool, int, int]:
        on = dist.is_available() and dist.is_initialized()
        return on, (dist.get_world_size() if on else 1), (dist.get_rank() if on else 0)

    @torch.no_grad()
    def launch_reduce_scatters(self) -> None:
        """Start averaging every bank's gradient; each rank will receive its own shard of the average."""
        distributed, world, _ = self._world()
        self._pending = {}
        if not distributed:
            return
        for gi in self.order:
            bank = self.param_groups[gi]["params"]
            if bank[0].grad is None:
                continue
            n = len(bank)
            padded = -(-n // world) * world
            buf = torch.zeros((padded, *bank[0].shape), dtype=torch.bfloat16, device=bank[0].device)
            buf[:n].copy_(torch.stack([p.grad for p in bank]))
            if dist.get_backend() == "nccl":
                shard = torch.empty((padded // world, *bank[0].shape), dtype=torch.bfloat16, device=buf.device)
                work = dist.reduce_scatter_tensor(shard, buf, op=dist.ReduceOp.AVG, async_op=True)
                self._pending[gi] = (shard, work)
            else:  # gloo: all-reduce the padded buffer and keep this rank's rows
                work = _average(buf, world, async_op=True)
                self._pending[gi] = (buf, work)

    @torch.no_grad()
    def step(self, closure=None):
        distributed, world, rank = self._world()
        previous = None
        for gi in self.order:
            group = self.param_groups[gi]
            bank = group["params"]
            if bank[0].grad is None:
                continue
            n = len(bank)
            per_rank = -(-n // world)
            if previous is not None:
                self._apply(*previous)
                previous = None
            if gi in self._pending:
                data, work = self._pending.pop(gi)
                work.wait()
                shard = data if data.shape[0] == per_rank else data[rank * per_rank : (rank + 1) * per_rank]
            else:
                shard = torch.stack([p.grad for p in bank]).bfloat16()
                if distributed:  # launch_reduce_scatters was not called: average in place, keep this rank's rows
                    padded = torch.zeros((per_rank * world, *bank[0].shape), dtype=torch.bfloat16, device=shard.device)
                    padded[:n] = shard
                    _average(padded, world)
                    shard = padded[rank * per_rank : (rank + 1) * per_rank]
            state = self.state[bank[0]]
            if "shard_momentum" not in state:
                state["shard_momentum"] = torch.zeros_like(shard)
            buf = state["shard_momentum"]
            momentum = group["momentum"]
            buf.mul_(momentum).add_(shard)
            update = shard.add(buf, alpha=momentum) if group["nesterov"] else buf
            if self.row_equilibrate != "off":
                update = equilibrate_rows(update, self.row_equilibrate)
            update = self._zeropower(update, steps=group["backend_steps"])
            if distributed:
                full = torch.empty((per_rank * world, *bank[0].shape), dtype=update.dtype, device=update.device)
                work = dist.all_gather_into_tensor(full, update.contiguous(), async_op=True)
                previous = (group, full, work)
            else:
                previous = (group, update, None)
        if previous is not None:
            self._apply(*previous)
        return None

    @staticmethod
    def _apply(group: dict, full: Tensor, work) -> None:
        if work is not None:
            work.wait()
        bank = group["params"]
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        rows, cols = bank[0].shape[-2], bank[0].shape[-1]
        scale = max(1, rows / cols) ** 0.5
        if wd > 0.0:
            torch._foreach_mul_(bank, 1.0 - lr * wd)
        updates = list(full[: len(bank)].to(dtype=bank[0].dtype).unbind(0))
        torch._foreach_add_(bank, updates, alpha=-lr * scale)


class ParallelMuonSet(OptimizerSet):
    syncs_gradients = True  # the model is not wrapped in DDP; this set averages every gradient itself

    def __init__(self, adam_tok, muon: BankedMuon, adam_scalar, head, replicated: list[nn.Parameter], params: ParallelMuonParams) -> None:
        optimizers = [adam_tok, muon, adam_scalar] + ([head] if head is not None else [])
        super().__init__(optimizers, params.grad_clip_norm)
        self.adam_tok, self.muon, self.adam_scalar, self.head = adam_tok, muon, adam_scalar, head
        self.replicated = replicated
        self.params = params

    def before_step(self, step: int) -> None:
        p = self.params
        frac = min(step / p.momentum_warmup_steps, 1.0) if p.momentum_warmup_steps > 0 else 1.0
        momentum = (1 - frac) * p.momentum_warmup_start + frac * p.momentum
        for group in self.muon.param_groups:
            group["momentum"] = momentum

    def step(self, model: nn.Module) -> None:
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
        self.muon.launch_reduce_scatters()
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            for p in self.replicated:
                if p.grad is not None:
                    _average(p.grad, world)
        self.adam_tok.step()
        self.adam_scalar.step()
        if self.head is not None:
            self.head.step()
        self.muon.step()


def group_banks(model: nn.Module) -> tuple[list[list[nn.Parameter]], set[int]]:
    """The records' four banks from the per-layer modules, plus any other block matrix grouped by shape."""
    banks: list[list[nn.Parameter]] = []
    taken: set[int] = set()
    for _, roles in BANK_ROLES:
        bank = []
        for part, name in roles:
            for block in model.blocks:
                linear = getattr(getattr(block, part, None), name, None)
                if isinstance(linear, nn.Linear):
                    bank.append(linear.weight)
        if bank:
            shapes = {tuple(p.shape) for p in bank}
            if len(shapes) > 1:
                raise ValueError(f"parallel_muon: the matrices of one bank differ in shape {sorted(shapes)}")
            banks.append(bank)
            taken |= {id(p) for p in bank}
    extra: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for name, p in model.block_named_parameters():
        if id(p) not in taken and p.ndim == 2 and not is_control(p) and not is_frozen(p):
            extra.setdefault(tuple(p.shape), []).append(p)
    for bank in extra.values():
        banks.append(bank)
        taken |= {id(p) for p in bank}
    return banks, taken


def build(params: ParallelMuonParams, ctx):
    tied = ctx.model.tie_embeddings

    def make(model, runtime) -> ParallelMuonSet:
        banks, in_banks = group_banks(model)
        trained = [(n, p) for n, p in model.named_parameters() if not is_frozen(p)]
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head_ids = {id(p) for p in model.head_parameters()}
        tok_id = id(model.token_embedding())
        tables = [model.token_embedding()]
        block_ids = {id(p) for p in model.blocks.parameters()}
        scalar = [p for n, p in model.block_named_parameters() if id(p) not in in_banks and not is_frozen(p)]
        for name, p in trained:
            if id(p) in block_ids or id(p) in head_ids or id(p) == tok_id:
                continue
            (tables if id(p) in embedding_ids else scalar).append(p)
        adam = dict(betas=(params.beta1, params.beta2), eps=params.adam_eps, weight_decay=params.adam_wd, fused=True)
        token_lr = params.tied_embed_lr if tied else params.embed_lr
        adam_tok = torch.optim.AdamW([{"params": [t], "lr": token_lr} for t in tables], **adam)
        muon = BankedMuon(
            banks, lr=params.matrix_lr, momentum=params.momentum, backend_steps=params.backend_steps,
            weight_decay=params.weight_decay, row_equilibrate=params.row_equilibrate,
        )
        adam_scalar = torch.optim.AdamW([{"params": scalar, "lr": params.scalar_lr}], **adam)
        head = None
        head_params = model.head_parameters()
        if head_params:
            head = torch.optim.Adam([{"params": head_params, "lr": params.head_lr}], betas=(params.beta1, params.beta2), eps=params.adam_eps, fused=True)
        replicated = tables + scalar + list(head_params)
        return ParallelMuonSet(adam_tok, muon, adam_scalar, head, replicated, params)

    return make


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="parallel_muon",
            slot="optimizer",
            params=ParallelMuonParams,
            build=build,
            summary="Muon over parameter banks: reduce-scatter, batched Newton-Schulz, all-gather, overlapped with AdamW; no DDP (PR #399/#549/#1392)",
            source="https://github.com/openai/parameter-golf/pull/399",
            example='[optimizer]\nuse = "parallel_muon"\nmatrix_lr = 0.025\nrow_equilibrate = "bf16"',
        )
    )
