"""Assembling the GPT from a stack: spec → modifiers (stack order) → modules (reference order) → init.

The result is plain ``nn.Module``s; no plugin code is dispatched while it runs, so it compiles with
``torch.compile(fullgraph=True)`` when its parts do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..config.checks import parse_layers
from ..config.schema import Stack
from ..contracts import Attaching, AuxProvider, Initializer, SequentialView
from ..errors import ConfigError
from ..registry import Registry
from .layers import RMSNorm, deferred_init
from .sites import ModifierName
from .spec import BuildContext, Component, ModelSpec, spec_from_stack


class GPT(nn.Module):
    """Embedding → topology over blocks → final RMSNorm → head (logits) → loss. Every part comes from a slot.

    Model-level modules that modifiers add (e.g. shared value embeddings) sit after the blocks, as in the
    references; those that provide ``aux(input_ids)`` contribute per-forward tensors (``aux``) that the
    topology hands to every block and the block to its attention, beside any the batch brings (``aux=``).
    """

    def __init__(
        self,
        embedding: nn.Module,
        topology: nn.Module,
        blocks: list[nn.Module],
        head: nn.Module,
        loss: nn.Module,
        root_modules: list[tuple[str, nn.Module]] = (),
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.topology = topology
        self.blocks = nn.ModuleList(blocks)
        self.aux_providers: list[str] = []
        for name, module in root_modules:
            self.add_module(name, module)
            if isinstance(module, AuxProvider):
                self.aux_providers.append(name)
        self.final_norm = RMSNorm()
        self.head = head
        self.loss = loss
        self.hessian_taps: dict[str, nn.Module] = {}
        """``{weight_name: module}``: weights that no ``CastedLinear`` applies, whose input is that module's output
        (for Hessian-aware quantizers; ``pgolf_core.calibration.collect_hessians``). Techniques fill it."""

    def hidden(self, input_ids: Tensor, aux: Mapping[str, Tensor] | None = None) -> Tensor:
        x = self.embedding(input_ids)
        merged: dict[str, Tensor] = dict(aux) if aux else {}
        for name in self.aux_providers:
            merged.update(getattr(self, name).aux(input_ids))
        x = self.topology(x, x, self.blocks, merged)
        return self.final_norm(x)

    def forward(self, input_ids: Tensor, target_ids: Tensor, aux: Mapping[str, Tensor] | None = None) -> Tensor:
        logits = self.head.logits(self.hidden(input_ids, aux), self.embedding.tok_emb.weight)
        return self.loss(logits, target_ids.reshape(-1))

    def logits(self, input_ids: Tensor, aux: Mapping[str, Tensor] | None = None) -> Tensor:
        return self.head.logits(self.hidden(input_ids, aux), self.embedding.tok_emb.weight)

    def last_logits(self, input_ids: Tensor) -> Tensor:
        """Logits of the last position only, (B, V): what sampling reads, without the head over the prefix."""
        return self.head.logits(self.hidden(input_ids)[:, -1:], self.embedding.tok_emb.weight).reshape(input_ids.shape[0], -1)

    # Parameter roles, for optimizer grouping -------------------------------------------------------------
    def token_embedding(self) -> nn.Parameter:
        return self.embedding.tok_emb.weight

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def block_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.blocks.named_parameters()

    def other_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters outside the token table, the blocks and the head (e.g. U-Net skip weights)."""
        skip = {id(self.token_embedding())} | {id(p) for p in self.head.parameters()} | {id(p) for p in self.blocks.parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in skip]


@contextlib.contextmanager
def sequential_view(objects: list[Any]) -> Iterator[None]:
    """Every block once, in order, for the duration: each technique that changes the data flow (depth
    recurrence, parallel wirings) switches itself off through its ``sequential_view`` (PR #1392 collected its
    GPTQ Hessians on such a copy of its model). Eager use only."""
    with contextlib.ExitStack() as stack:
        for obj in objects:
            if isinstance(obj, SequentialView):
                stack.enter_context(obj.sequential_view())
        yield


def apply_modifiers(spec: ModelSpec, stack: Stack, registry: Registry) -> list[Any]:
    """Run each modifier's ``transform`` in stack-file order; returns the modifier objects (loop events)."""
    objects = []
    ctx = BuildContext(stack.model, stack.run, stack.data)
    for index, mod in enumerate(stack.modifiers):
        reg = registry.get("modifier", mod.technique)
        assert reg is not None
        layers = parse_layers(mod.layers, stack.model.num_layers)
        obj = reg.technique.build(mod.params, ctx)
        name = ModifierName(index, mod.technique)
        try:
            obj.transform(spec, layers, name)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{stack.path}: {name}: {exc}") from None
        objects.append(obj)
    return objects


def _build(component: Component, base: BuildContext, where: str, layer: int | None = None, **kwargs: Any) -> Any:
    ctx = base.for_component(component, layer)
    try:
        built = component.technique.build(component.params, ctx, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"while building {where} ({component.technique.name}): {exc}") from None
    unsupported = ctx.unsupported()
    if unsupported:
        offered = sorted(getattr(type(built), "SITES", {})) + sorted(getattr(type(built), "PARTS", {}))
        hint = f" (it offers: {', '.join(offered)})" if offered else ""
        raise ConfigError(f"{where} uses '{component.technique.name}', which does not support {'; '.join(unsupported)}{hint}")
    return built


def build_model(stack: Stack, registry: Registry) -> tuple[GPT, list[Any]]:
    """Build the model on the current default device, in the reference's parameter-creation order."""
    spec = spec_from_stack(stack, registry)
    modifier_objects = apply_modifiers(spec, stack, registry)
    base = BuildContext(stack.model, stack.run, stack.data)
    embedding = _build(spec.embedding, base, "embedding")
    topology = _build(spec.topology, base, "topology")
    init = _build(spec.init, base, "init")  # an object: building it draws nothing
    if not isinstance(init, Initializer):
        raise ConfigError(f"init '{spec.init.technique.name}' built {type(init).__name__}, which is not an initializer (call with the model; attribute writes_block_weights)")
    blocks = []
    with deferred_init(init.writes_block_weights):
        for i, layer in enumerate(spec.layers):
            attn = _build(layer.attention, base, f"blocks.{i}.attention", i)
            mlp = _build(layer.mlp, base, f"blocks.{i}.mlp", i)
            blocks.append(_build(layer.residual, base, f"blocks.{i}", i, attn=attn, mlp=mlp))
    roots = [(name, factory()) for name, factory, _ in spec.root_modules]
    head = _build(spec.head, base, "head")
    loss = _build(spec.loss, base, "loss")
    model = GPT(embedding, topology, blocks, head, loss, roots)
    with torch.no_grad():
        init(model)
    for obj in modifier_objects:
        if isinstance(obj, Attaching):
            obj.attach(model)
    return model, modifier_objects


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
