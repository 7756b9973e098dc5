"""Insertion sites and replaceable parts: how a modifier brings its own modules to a host module.

A *host* is a module built for a slot (the attention, the MLP, the block, the embedding, the topology).
It declares, in its class attribute ``SITES``, named places in its forward where other techniques may act,
and in ``PARTS`` named sub-modules that another technique may replace. While the host is constructed it
asks its build context for each one, *at the point in its creation order where those modules should be
created* (so parameter creation order and RNG draws follow the reference scripts)::

    class CausalSelfAttention(nn.Module):
        SITES = {"heads_out": "(y (B,T,H,D), v (B,T,Hkv,D), x (B,T,d), aux) -> y: per-head outputs before the heads merge"}

        def __init__(self, ..., sites=NO_SITES):
            ...
            self.heads_out = sites.site("heads_out", self)   # None when nothing is installed

        def forward(self, x, aux=None):
            ...
            if self.heads_out is not None:
                y = self.heads_out(y, v, x, aux)

A modifier installs a module factory at a site (``spec.install``), or replaces a part (``spec.replace``), in
its ``transform``; the factory receives the host, so it can read the host's dimensions. Several modules at
one site run in stack-file order, each receiving the previous one's output as its first argument. An empty
site is ``None``: it adds no module, no parameter and no operation to the graph. Installing at a site the
chosen host does not declare is reported at build time with the host's list of sites.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

Factory = Callable[[nn.Module], nn.Module]


class Site(nn.ModuleDict):
    """The modules installed at one site of a host, keyed by the installing technique's name, applied in
    stack order: ``value = m(value, *context)`` for each."""

    def forward(self, value: Any, *context: Any) -> Any:
        for module in self.values():
            value = module(value, *context)
        return value


class ModifierName(str):
    """How a modifier is named in messages (``modifier[3](xsa)``), carrying its index and technique name."""

    technique: str
    index: int

    def __new__(cls, index: int, technique: str) -> "ModifierName":
        self = super().__new__(cls, f"modifier[{index}]({technique})")
        self.technique = technique
        self.index = index
        return self


def install_key(by: str) -> str:
    """The name an installed module gets at its site: the technique's name (``xsa``), from a ``ModifierName``
    or any other string naming the installer."""
    technique = getattr(by, "technique", None)
    if technique:
        return technique
    return "".join(c if c.isalnum() or c == "_" else "_" for c in str(by)).strip("_") or "module"


class SiteBuilder:
    """What a host asks while it is constructed. ``NO_SITES`` (the default of every host's constructor) has
    nothing installed, so hosts built directly in tests or by other techniques are plain baseline modules."""

    def site(self, name: str, host: nn.Module) -> Site | None:
        return None

    def part(self, name: str, host: nn.Module) -> nn.Module | None:
        return None


NO_SITES = SiteBuilder()
