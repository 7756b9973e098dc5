"""The model spec: which technique builds each component, before any module exists.

Modifiers rewrite this spec (never live modules), so that modules are still created in the reference's
order and consume the same RNG draws. A modifier *claims* an option on a component (``claim``); the
component's builder reads it with ``ctx.option(key)``. Two modifiers claiming the same option on the same
component is a conflict, and an option nobody read means the chosen technique does not support that
modifier: both are reported at validate time.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..config.schema import DataConfig, ModelConfig, RunConfig, Stack
from ..errors import ConfigError
from ..registry import Registry, Technique


@attrs.define
class Component:
    technique: Technique
    params: Any
    options: dict[str, Any] = attrs.field(factory=dict)
    claimed_by: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class LayerSpec:
    attention: Component
    mlp: Component
    residual: Component


@attrs.define
class ModelSpec:
    model: ModelConfig
    embedding: Component
    topology: Component
    layers: list[LayerSpec]
    head: Component
    init: Component
    root_modules: list[tuple[str, Any, str]] = attrs.field(factory=list)
    """(attribute name, factory, claimed by): modules created on the model after the blocks, in stack order."""

    def add_root_module(self, name: str, factory: Any, by: str) -> None:
        for existing, _, owner in self.root_modules:
            if existing == name:
                raise ConfigError(f"modifiers '{owner}' and '{by}' both add the model-level module '{name}'; drop one")
        self.root_modules.append((name, factory, by))

    def component(self, slot: str, layer: int | None = None) -> Component:
        if slot in ("attention", "mlp", "residual"):
            if layer is None:
                raise ValueError(f"slot {slot} needs a layer index")
            return getattr(self.layers[layer], slot)
        return getattr(self, slot)

    def claim(self, slot: str, layer: int | None, key: str, value: Any, by: str) -> None:
        comp = self.component(slot, layer)
        if key in comp.options:
            where = f"layer {layer} {slot}" if layer is not None else slot
            raise ConfigError(
                f"modifiers '{comp.claimed_by[key]}' and '{by}' both set '{key}' on {where}; narrow 'layers' or drop one"
            )
        comp.options[key] = value
        comp.claimed_by[key] = by


@attrs.define
class BuildContext:
    """What a builder sees: the core tables, its layer, and the options modifiers claimed on it."""

    model: ModelConfig
    run: RunConfig
    data: DataConfig
    layer: int | None = None
    component: Component | None = None
    _read: set[str] = attrs.field(factory=set)

    def option(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        if self.component is None:
            return default
        return self.component.options.get(key, default)

    def for_component(self, component: Component, layer: int | None = None) -> "BuildContext":
        return BuildContext(self.model, self.run, self.data, layer, component)

    def unread_options(self) -> list[str]:
        if self.component is None:
            return []
        return [k for k in self.component.options if k not in self._read]


def spec_from_stack(stack: Stack, registry: Registry) -> ModelSpec:
    def comp(slot: str) -> Component:
        choice = stack.slots[slot]
        reg = registry.get(slot, choice.technique)
        assert reg is not None, f"unresolved technique {choice.technique}"
        return Component(reg.technique, choice.params)

    layers = [LayerSpec(comp("attention"), comp("mlp"), comp("residual")) for _ in range(stack.model.num_layers)]
    return ModelSpec(stack.model, comp("embedding"), comp("topology"), layers, comp("head"), comp("init"))
