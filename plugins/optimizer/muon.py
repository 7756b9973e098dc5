"""Muon for the blocks' matrices, Adam for the embedding, head and control/scalar parameters.

From the official baseline ``train_gpt.py`` (Muon as in modded-nanogpt): momentum with Nesterov, the
update orthogonalised by 5 Newton–Schulz steps in bf16 and scaled by ``sqrt(max(1, rows/cols))``; the
matrices are assigned round-robin to ranks and the updates all-reduced. Momentum warms up linearly from
``momentum_warmup_start`` over ``momentum_warmup_steps``. Parameter split and learning rates as the
reference: tied embedding at ``tied_embed_lr`` (``embed_lr`` when untied), ``head_lr`` for an untied head,
``matrix_lr`` for 2-D block weights, ``scalar_lr`` for everything else.

Decoupled weight decay (the #315 line of records, PRs #400/#450): Muon applies ``p *= 1 - lr*weight_decay``
before each update, and the token/scalar groups become AdamW with ``adam_wd``. Parameters outside the
blocks are grouped as those records do: embedding tables (BigramHash, value embeddings) with the token
embedding, other 2-D weights to Muon, the rest with the scalars.

Separate embedding weight decay (the #1218 record, ``EMBED_WD``): the tables' AdamW takes ``embed_wd`` instead of
``adam_wd`` (#1218: 0.085 on the tables, 0.02 on the scalars, 0.085 in Muon), since the tables' RMS, like the
matrices', sets how well they compress while the scalars need no shrinking. ``embed_wd = -1`` keeps one decay.
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


def _embed_wd_valid(instance, attribute, value) -> None:
    if value < 0 and value != -1:
        raise ValueError(f"{attribute.name} must be >= 0, or -1 for adam_wd; got {value!r}")


@attrs.define(frozen=True, kw_only=True)
class MuonParams:
    embed_lr: float = param(0.6, help="Adam LR of an untied token embedding", env="EMBED_LR", validator=non_negative)
    head_lr: float = param(0.008, help="Adam LR of an untied output head", env="HEAD_LR", validator=non_negative)
    tied_embed_lr: float = param(0.05, help="Adam LR of the tied token embedding", env="TIED_EMBED_LR", validator=non_negative)
    matrix_lr: float = param(0.04, help="Muon LR of 2-D block weights", env="MATRIX_LR", validator=non_negative)
    scalar_lr: float = param(0.04, help="Adam LR of vectors, scalars and control tensors", env="SCALAR_LR", validator=non_negative)
    momentum: float = param(0.95, help="Muon momentum after warmup", env="MUON_MOMENTUM", validator=non_negative)
    backend_steps: int = param(5, help="Newton-Schulz iterations", env="MUON_BACKEND_STEPS", validator=positive)
    momentum_warmup_start: float = param(0.85, help="Muon momentum at step 0", env="MUON_MOMENTUM_WARMUP_START")
    momentum_warmup_steps: int = param(500, help="steps of linear momentum warmup", unit="steps", env="MUON_MOMENTUM_WARMUP_STEPS", validator=non_negative)
    beta1: float = param(0.9, help="Adam beta1", env="BETA1")
    beta2: float = param(0.95, help="Adam beta2", env="BETA2")
    adam_eps: float = param(1e-8, help="Adam epsilon", env="ADAM_EPS", validator=positive)
    grad_clip_norm: float = param(0.0, help="global grad-norm clip; 0 disables", env="GRAD_CLIP_NORM", validator=non_negative)
    weight_decay: float = param(0.0, help="Muon decoupled weight decay (scaled by the scheduled lr)", env=("MUON_WD", "MUON_WEIGHT_DECAY"), validator=non_negative)
    adam_wd: float = param(0.0, help="AdamW weight decay of the token and scalar groups; 0 keeps plain Adam", env=("ADAM_WD", "ADAM_WEIGHT_DECAY"), validator=non_negative)
    embed_wd: float = param(-1.0, help="AdamW weight decay of the embedding tables (token, value and bigram tables) alone; -1 = adam_wd (PR #1218: 0.085)", env="EMBED_WD", validator=_embed_wd_valid)
    row_equilibrate: str = param(
        "off",
        help="MuonEq-R: divide each row of the momentum update by its L2 norm before Newton-Schulz; "
        "'fp32' = PR #1319 (norm in fp32, floor 1e-7), 'bf16' = PR #1392 (rsqrt of sum of squares + 1e-7 in the update dtype)",
        validator=one_of("off", "fp32", "bf16"),
    )


def adam_for(weight_decay: float, params: MuonParams):
    """``(class, kwargs)``: AdamW with ``weight_decay`` when it is positive, else plain Adam (fused, as the references)."""
    kwargs = dict(betas=(params.beta1, params.beta2), eps=params.adam_eps, fused=True)
    if weight_decay > 0:
        return torch.optim.AdamW, {**kwargs, "weight_decay": weight_decay}
    return torch.optim.Adam, kwargs


def equilibrate_rows(update: Tensor, mode: str) -> Tensor:
    """MuonEq-R (arXiv 2603.28254, variant R): unit-norm rows (last axis) before orthogonalisation.

    The two records compute it differently, so both are kept bit for bit: PR #1319 takes the norm in fp32
    and clamps it at 1e-7; PR #1392 adds 1e-7 to the sum of squares in the update's own dtype (bf16).
    """
    if mode == "fp32":
        return update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype)
    if mode == "bf16":
        return update / ((update * update).sum(dim=-1, keepdim=True) + 1e-7).sqrt()
    return update


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 10, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a 2-D matrix with the quintic Newton–Schulz iteration, in bf16."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    X /= X.norm() + eps
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True, weight_decay: float = 0.0, zeropower=None,
        row_equilibrate: str = "off",
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov, weight_decay=weight_decay))
        self._zeropower = zeropower or zeropower_via_newtonschulz5
        self.row_equilibrate = row_equilibrate

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            total = sum(int(p.numel()) for p in params)
            updates_flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            curr = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=momentum)
                    if self.row_equilibrate != "off":
                        g = equilibrate_rows(g, self.row_equilibrate)
                    g = self._zeropower(g, steps=group["backend_steps"])
                    g *= max(1, g.size(0) / g.size(1)) ** 0.5
                    updates_flat[curr : curr + p.numel()] = g.reshape(-1)
                curr += p.numel()
            if distributed:
                dist.all_reduce(updates_flat, op=dist.ReduceOp.SUM)
            wd = group.get("weight_decay", 0.0)
            curr = 0
            for p in params:
                if wd > 0.0:
                    p.data.mul_(1.0 - lr * wd)
                g = updates_flat[curr : curr + p.numel()].view_as(p).to(dtype=p.dtype)
                p.add_(g, alpha=-lr)
                curr += p.numel()
        return None


class MuonAdamSet(OptimizerSet):
    def __init__(self, optimizers, muon: Muon, params: MuonParams) -> None:
        super().__init__(optimizers, params.grad_clip_norm)
        self.muon = muon
        self.params = params

    def before_step(self, step: int) -> None:
        p = self.params
        frac = min(step / p.momentum_warmup_steps, 1.0) if p.momentum_warmup_steps > 0 else 1.0
        momentum = (1 - frac) * p.momentum_warmup_start + frac * p.momentum
        for group in self.muon.param_groups:
            group["momentum"] = momentum


def build(params: MuonParams, ctx):
    tied = ctx.model.tie_embeddings

    def make(model, runtime) -> MuonAdamSet:
        block_named = [(n, p) for n, p in model.block_named_parameters() if not is_frozen(p)]
        matrix = [p for n, p in block_named if p.ndim == 2 and not is_control(p)]
        scalar = [p for n, p in block_named if not (p.ndim == 2 and not is_control(p))]
        tables = [model.token_embedding()]
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for name, p in model.other_named_parameters():
            if is_frozen(p):
                continue  # e.g. PR #1392's recurrence scales: in no optimizer
            if id(p) in embedding_ids:
                tables.append(p)
            elif p.ndim == 2 and not is_control(p):
                matrix.append(p)
            else:
                scalar.append(p)
        adam_cls, adam = adam_for(params.adam_wd, params)
        tok_cls, tok_adam = adam_for(params.adam_wd if params.embed_wd == -1 else params.embed_wd, params)
        token_lr = params.tied_embed_lr if tied else params.embed_lr
        opt_tok = tok_cls([{"params": [t], "lr": token_lr} for t in tables], **tok_adam)
        zeropower = runtime.compiled(zeropower_via_newtonschulz5)  # compiled in the baseline and every #315-line script
        opt_muon = Muon(
            matrix, lr=params.matrix_lr, momentum=params.momentum, backend_steps=params.backend_steps,
            weight_decay=params.weight_decay, zeropower=zeropower, row_equilibrate=params.row_equilibrate,
        )
        opt_scalar = adam_cls([{"params": scalar, "lr": params.scalar_lr}], **adam)
        optimizers = [opt_tok, opt_muon, opt_scalar]
        head = model.head_parameters()
        if head:
            head_adam = dict(betas=(params.beta1, params.beta2), eps=params.adam_eps, fused=True)
            optimizers.insert(1, torch.optim.Adam([{"params": head, "lr": params.head_lr}], **head_adam))
        return MuonAdamSet(optimizers, opt_muon, params)

    return make


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="muon",
            slot="optimizer",
            params=MuonParams,
            build=build,
            summary="Muon (Newton-Schulz, rank round-robin) for block matrices + Adam for embedding/head/scalars",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[optimizer]\nuse = "muon"\nmatrix_lr = 0.04\nscalar_lr = 0.04\ntied_embed_lr = 0.05',
        )
    )
