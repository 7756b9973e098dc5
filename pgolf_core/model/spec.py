"""The model spec: which technique builds each component, and what modifiers bring to it, before any
module exists.

Modifiers rewrite this spec (never live modules), so that modules are still created in the reference's
order and consume the same RNG draws. A modifier acts on a component in one of three ways:

* ``install(slot, layer, site, factory, by)``: add a module of its own at one of the host's sites
  (``pgolf_core.model.sites``); several modules at one site run in stack order;
* ``replace(slot, layer, part, factory, by)``: supply the host's replaceable part (one per part);
* ``claim(slot, layer, key, value, by)``: set a plain datum the host reads with ``ctx.option(key)``.

Two modifiers replacing the same part, installing the same technique twice at one site, or claiming the
same option on one component are conflicts; an installation at a site the host does not have, or an
option nobody read, means the chosen technique does not support that modifier. All are reported when the
model is built (``pgolf validate`` builds it on the meta device).
"""

from __future__ import annotations

from typing import Any

import dataclasses
from torch import nn

from ..config.schema import DataConfig, ModelConfig, RunConfig, Stack
from ..errors import ConfigError
from ..registry import Registry, Technique
from .layers import deferred_init
from .sites import Factory, Site, SiteBuilder, install_key

PER_LAYER = ("attention", "mlp", "residual")
MODULE_SLOTS = ("embedding", "topology", "head", "loss", *PER_LAYER)


@dataclasses.dataclass
class Component:
    technique: Technique
    params: Any
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    claimed_by: dict[str, str] = dataclasses.field(default_factory=dict)
    installs: dict[str, list[tuple[str, Factory, str]]] = dataclasses.field(default_factory=dict)
    """site name → [(key, factory, installed by)] in stack order."""
    parts: dict[str, tuple[Factory, str]] = dataclasses.field(default_factory=dict)
    """part name → (factory, replaced by)."""


@dataclasses.dataclass
class LayerSpec:
    attention: Component
    mlp: Component
    residual: Component


@dataclasses.dataclass
class ModelSpec:
    model: ModelConfig
    embedding: Component
    topology: Component
    layers: list[LayerSpec]
    head: Component
    loss: Component
    init: Component
    root_modules: list[tuple[str, Any, str]] = dataclasses.field(default_factory=list)
    """(attribute name, factory, added by): modules created on the model after the blocks, in stack order."""

    def add_root_module(self, name: str, factory: Any, by: str) -> None:
        for existing, _, owner in self.root_modules:
            if existing == name:
                raise ConfigError(f"modifiers '{owner}' and '{by}' both add the model-level module '{name}'; drop one")
        self.root_modules.append((name, factory, by))

    def component(self, slot: str, layer: int | None = None) -> Component:
        if slot in PER_LAYER:
            if layer is None:
                raise ValueError(f"slot {slot} needs a layer index")
            return getattr(self.layers[layer], slot)
        if slot not in MODULE_SLOTS:
            raise ValueError(f"slot {slot} builds no module; modifiers act on {', '.join(MODULE_SLOTS)}")
        return getattr(self, slot)

    def claim(self, slot: str, layer: int | None, key: str, value: Any, by: str) -> None:
        comp = self.component(slot, layer)
        if key in comp.options:
            raise ConfigError(f"modifiers '{comp.claimed_by[key]}' and '{by}' both set '{key}' on {_where(slot, layer)}; narrow 'layers' or drop one")
        comp.options[key] = value
        comp.claimed_by[key] = by

    def install(self, slot: str, layer: int | None, site: str, factory: Factory, by: str) -> None:
        """Install ``factory(host)`` at ``site`` of the component; the module is named after the technique."""
        comp = self.component(slot, layer)
        key = install_key(by)
        entries = comp.installs.setdefault(site, [])
        for other_key, _, other in entries:
            if other_key == key:
                raise ConfigError(f"modifiers '{other}' and '{by}' both install '{key}' at {_where(slot, layer)} site '{site}'; narrow 'layers' or drop one")
        entries.append((key, factory, by))

    def replace(self, slot: str, layer: int | None, part: str, factory: Factory, by: str) -> None:
        """Make ``factory(host)`` the component's part ``part`` (at most one modifier per part)."""
        comp = self.component(slot, layer)
        if part in comp.parts:
            raise ConfigError(f"modifiers '{comp.parts[part][1]}' and '{by}' both replace '{part}' on {_where(slot, layer)}; narrow 'layers' or drop one")
        comp.parts[part] = (factory, by)


def _where(slot: str, layer: int | None) -> str:
    return f"layer {layer} {slot}" if layer is not None else slot


class BuildContext(SiteBuilder):
    """What a builder sees: the core tables, its layer, the options modifiers claimed on it, and (as a
    ``SiteBuilder``) the modules they installed at its sites and parts."""

    def __init__(self, model: ModelConfig, run: RunConfig, data: DataConfig, layer: int | None = None, component: Component | None = None) -> None:
        self.model, self.run, self.data = model, run, data
        self.layer = layer
        self.component = component
        self._read: set[str] = set()
        self._sites: dict[str, str] = {}  # site/part name → the host class that declared it
        self._parts: set[str] = set()

    def option(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        if self.component is None:
            return default
        return self.component.options.get(key, default)

    def site(self, name: str, host: nn.Module) -> Site | None:
        self._sites[name] = type(host).__name__
        entries = self.component.installs.get(name, []) if self.component is not None else []
        if not entries:
            return None
        site = Site()
        for key, factory, by in entries:
            site[key] = _made(factory, host, by, f"site '{name}'")
        return site

    def part(self, name: str, host: nn.Module) -> nn.Module | None:
        self._parts.add(name)
        entry = self.component.parts.get(name) if self.component is not None else None
        if entry is None:
            return None
        factory, by = entry
        return _made(factory, host, by, f"part '{name}'")

    def for_component(self, component: Component, layer: int | None = None) -> "BuildContext":
        return BuildContext(self.model, self.run, self.data, layer, component)

    def unsupported(self) -> list[str]:
        """What modifiers asked of this component that its technique did not offer, one phrase each."""
        if self.component is None:
            return []
        comp, out = self.component, []
        for key in comp.options:
            if key not in self._read:
                out.append(f"option '{key}' set by {comp.claimed_by[key]}")
        for site, entries in comp.installs.items():
            if site not in self._sites:
                for _, _, by in entries:
                    out.append(f"site '{site}' used by {by}")
        for part, (_, by) in comp.parts.items():
            if part not in self._parts:
                out.append(f"part '{part}' replaced by {by}")
        return out


def _made(factory: Factory, host: nn.Module, by: str, what: str) -> nn.Module:
    """A modifier's module for a host's site or part. It draws its initial weights from the RNG when it is built,
    as in the records that introduced it: an init that writes the host's own matrices (banks) defers only those."""
    try:
        with deferred_init(False):
            module = factory(host)
    except ConfigError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{by}: cannot build its module for {what} of {type(host).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{by}: the factory for {what} returned {type(module).__name__}, not an nn.Module")
    return module


def spec_from_stack(stack: Stack, registry: Registry) -> ModelSpec:
    def comp(slot: str) -> Component:
        choice = stack.slots[slot]
        reg = registry.get(slot, choice.technique)
        assert reg is not None, f"unresolved technique {choice.technique}"
        return Component(reg.technique, choice.params)

    layers = [LayerSpec(comp("attention"), comp("mlp"), comp("residual")) for _ in range(stack.model.num_layers)]
    return ModelSpec(stack.model, comp("embedding"), comp("topology"), layers, comp("head"), comp("loss"), comp("init"))
