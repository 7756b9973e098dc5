"""What a technique can plug into, read from the code: hooks, slots, capabilities, loop events, and the sites
and parts of host techniques. ``docs/hooks.md`` is ``render(builtin_registry())`` (``python
tools/gen_hooks_doc.py`` writes it; a test checks it is current); ``pgolf list`` and ``pgolf show`` print the
sites and parts of any registered technique with the same discovery.

Hosts are found by building, never by name: a technique of a model slot is built on the meta device inside
the bundled ``sample`` stack (its ``example`` stanza merged in), and the built module's class attributes
``SITES`` and ``PARTS`` are read. Where the modules installed at a site live is found by installing a probe at
each site and looking for it among the host's sub-modules. What a modifier acts on is found by running its
``transform`` on the sample stack's spec and by building the model (``attach`` may set sites on live modules).
Nothing here is imported by a training run.
"""

from __future__ import annotations

import inspect
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

HOST_PATHS = {
    "embedding": "embedding",
    "attention": "blocks.{i}.attn",
    "mlp": "blocks.{i}.mlp",
    "residual": "blocks.{i}",
    "topology": "topology",
    "head": "head",
    "loss": "loss",
}
"""Where the module built for each model slot sits in the GPT (and so in the state dict); ``{i}`` is the layer."""


@attrs.define(frozen=True)
class HostInterface:
    """A technique's module as a host: its class, where it sits, its sites and parts (name → signature), and
    the attribute of the host that holds each site's modules and each part."""

    slot: str
    technique: str
    host: str
    path: str
    sites: dict[str, str]
    parts: dict[str, str]
    site_attrs: dict[str, str]
    part_attrs: dict[str, str] = attrs.field(factory=dict)

    def site_path(self, site: str) -> str:
        """The state-dict prefix of the modules installed at ``site`` (``blocks.{i}.attn.heads_out.{technique}``)."""
        return f"{self.path}.{self.site_attrs.get(site, site)}.{{technique}}"

    def part_path(self, part: str) -> str:
        """The state-dict prefix of the module that replaces ``part`` (``blocks.{i}.attn.rotary``)."""
        return f"{self.path}.{self.part_attrs.get(part, part)}"


@attrs.define(frozen=True)
class Footprint:
    """What a modifier asks of the model: sites it installs at, parts it replaces, options it claims (each as
    ``slot.name``), model-level modules it adds, and sites of live modules it sets in ``attach``."""

    installs: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    root_modules: tuple[str, ...] = ()
    weight_transforms: int = 0

    def lines(self) -> list[str]:
        out = []
        if self.installs:
            out.append(f"installs at: {', '.join(self.installs)}")
        if self.replaces:
            out.append(f"replaces: {', '.join(self.replaces)}")
        if self.options:
            out.append(f"claims: {', '.join(self.options)}")
        if self.root_modules:
            out.append(f"adds model-level modules: {', '.join(self.root_modules)}")
        if self.weight_transforms:
            out.append("sets CastedLinear.weight_transform (in attach)")
        return out


# -- discovery ------------------------------------------------------------------------------------------------
def builtin_registry() -> Any:
    """pgolf's own techniques only (no third-party autoload): what docs/hooks.md describes."""
    from .registry import Registry

    registry = Registry()
    registry.load_entry_points(allow=set())
    return registry


def example_stack(registry: Any, registration: Any) -> Any:
    """The bundled ``sample`` stack with the technique's ``example`` stanza merged in (a stanza that does not
    select the technique gets ``use = name`` added), deep enough for the layers the example lists."""
    import tomli_w

    from .config.bundled import bundled_stack
    from .config.load import deep_merge, load_stack

    technique = registration.technique
    example = tomllib.loads(technique.example) if technique.example.strip() else {}
    if technique.slot == "modifier":
        entries = [e for e in example.get("modifier", []) if isinstance(e, dict)]
        if not any(e.get("use") == technique.name for e in entries):
            example["modifier"] = [*entries, {"use": technique.name}]
    elif not isinstance(example.get(technique.slot), dict) or example[technique.slot].get("use") != technique.name:
        example[technique.slot] = {"use": technique.name}
    sample = bundled_stack("sample")
    base = tomllib.loads(sample.read_text(encoding="utf-8"))
    data = deep_merge({"schema_version": 1, "extends": str(sample.resolve())}, example)
    layers = base.get("model", {}).get("num_layers", 1)
    deepest = max([_layers_selecting(m.get("layers", "all"), layers) for m in example.get("modifier", []) if isinstance(m, dict)], default=layers)
    if deepest > layers:
        data.setdefault("model", {})["num_layers"] = deepest
    with tempfile.TemporaryDirectory(prefix="pgolf-hooks-") as tmp:
        path = Path(tmp) / f"{technique.name}.toml"
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
        return load_stack(path, registry)


def _layers_selecting(selector: Any, num_layers: int, most: int = 64) -> int:
    """The fewest layers (at least ``num_layers``) for which ``selector`` selects some: ``"7:"`` needs 8."""
    from .config.checks import parse_layers

    for n in range(num_layers, most + 1):
        try:
            if parse_layers(selector, n):
                return n
        except ValueError:
            continue
    return num_layers


class _Probe:
    """Marks where a site keeps its modules, or where a part sits (made an ``nn.Module`` lazily, so importing this
    file needs no torch)."""

    target: str


def _probe(target: str) -> Any:
    from torch import nn

    class Probe(nn.Module, _Probe):
        def forward(self, value: Any, *context: Any) -> Any:
            return value

    probe = Probe()
    probe.target = target
    return probe


def _build_host(stack: Any, registry: Any, slot: str, sites: Iterable[str] = (), parts: Iterable[str] = ()) -> Any:
    """The module the stack's technique builds for ``slot`` (layer 0 for per-layer slots), on the meta device,
    with a probe installed at each of ``sites`` and as each of ``parts``."""
    import torch

    from .model.spec import PER_LAYER, BuildContext, spec_from_stack

    spec = spec_from_stack(stack, registry)
    layer = 0 if slot in PER_LAYER else None
    for site in sites:
        spec.install(slot, layer, site, lambda host, site=site: _probe(site), by="probe")
    for part in parts:
        spec.replace(slot, layer, part, lambda host, part=part: _probe(part), by="probe")
    base = BuildContext(stack.model, stack.run, stack.data)

    def build(which: str) -> Any:
        comp = spec.component(which, layer)
        extra = {"attn": build("attention"), "mlp": build("mlp")} if which == "residual" else {}
        return comp.technique.build(comp.params, base.for_component(comp, layer), **extra)

    with torch.device("meta"):
        return build(slot)


def host_interface(registry: Any, registration: Any, stack: Any = None) -> HostInterface | None:
    """The sites and parts of a technique's module, or None when its slot builds no module (optimizer, ...)."""
    technique = registration.technique
    if technique.slot not in HOST_PATHS:
        return None
    stack = stack if stack is not None else example_stack(registry, registration)
    host = _build_host(stack, registry, technique.slot)
    sites = dict(getattr(type(host), "SITES", None) or {})
    parts = dict(getattr(type(host), "PARTS", None) or {})
    site_attrs: dict[str, str] = {}
    if sites:
        probed = _build_host(stack, registry, technique.slot, sites=sites)
        for name, module in probed.named_modules():
            if isinstance(module, _Probe):
                site_attrs[module.target] = name.rsplit(".", 1)[0]
    part_attrs: dict[str, str] = {}
    for part in parts:
        try:  # a host may use its part while it is constructed (the U-Net reads schedule.num_skips)
            probed = _build_host(stack, registry, technique.slot, parts=(part,))
        except Exception:
            continue
        part_attrs.update({module.target: name for name, module in probed.named_modules() if isinstance(module, _Probe)})
    return HostInterface(technique.slot, technique.name, type(host).__name__, HOST_PATHS[technique.slot], sites, parts, site_attrs, part_attrs)


def modifier_footprint(registry: Any, registration: Any, stack: Any = None) -> Footprint:
    """What a modifier's ``transform`` (on the example stack's spec) and ``attach`` (on a meta-device build) touch."""
    import torch

    from .model.gpt import apply_modifiers, build_model
    from .model.layers import CastedLinear
    from .model.spec import spec_from_stack

    name = registration.technique.name
    stack = stack if stack is not None else example_stack(registry, registration)
    spec = spec_from_stack(stack, registry)
    apply_modifiers(spec, stack, registry)

    def mine(by: Any) -> bool:
        return getattr(by, "technique", None) == name

    components = [("embedding", spec.embedding), ("topology", spec.topology), ("head", spec.head), ("loss", spec.loss)]
    for layer in spec.layers:
        components += [("attention", layer.attention), ("mlp", layer.mlp), ("residual", layer.residual)]
    installs, replaces, options = {}, {}, {}
    for slot, comp in components:
        for site, entries in comp.installs.items():
            if any(mine(by) for _, _, by in entries):
                installs[f"{slot}.{site}"] = None
        for part, (_, by) in comp.parts.items():
            if mine(by):
                replaces[f"{slot}.{part}"] = None
        for key, by in comp.claimed_by.items():
            if mine(by):
                options[f"{slot}.{key}"] = None
    roots = tuple(n for n, _, by in spec.root_modules if mine(by))
    plain_stack = attrs.evolve(stack, modifiers=tuple(m for m in stack.modifiers if m.technique != name))
    with torch.device("meta"):
        model, _ = build_model(stack, registry)
        plain, _ = build_model(plain_stack, registry)
    transforms = sum(1 for m in model.modules() if isinstance(m, CastedLinear) and m.weight_transform is not None)
    transforms -= sum(1 for m in plain.modules() if isinstance(m, CastedLinear) and m.weight_transform is not None)
    return Footprint(tuple(installs), tuple(replaces), tuple(options), roots, max(transforms, 0))


def casted_linear_sites() -> dict[str, str]:
    """``CastedLinear``'s one site, set on live layers after the build rather than installed through the spec."""
    from .model.layers import CastedLinear

    return dict(CastedLinear.SITES)


# -- rendering --------------------------------------------------------------------------------------------------
def _md(text: str) -> str:
    """A docstring as one markdown line: RST literals become code spans, whitespace collapses, pipes escape."""
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def _doc(obj: Any) -> str:
    return _md(inspect.cleandoc(obj.__doc__ or ""))


def _annotation(a: Any) -> str:
    return a if isinstance(a, str) else getattr(a, "__name__", repr(a))


def _signature(fn: Any, name: str | None = None, drop_self: bool = True, annotate: bool = True) -> str:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1 if drop_self else 0 :]
    shown = []
    for p in params:
        text = p.name
        if annotate and p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        shown.append(text)
    ret = f" -> {_annotation(sig.return_annotation)}" if annotate and sig.return_annotation is not sig.empty else ""
    return f"{name or fn.__name__}({', '.join(shown)}){ret}"


def protocol_members(protocol: Any, module: bool = False) -> list[str]:
    """A protocol's attributes (``name: type``) and methods (signatures as written in ``pgolf_core.contracts``);
    ``__call__`` of an ``nn.Module`` protocol is shown as the ``forward`` that implements it."""
    out = [f"{n}: {_annotation(a)}" for n, a in inspect.get_annotations(protocol).items()]
    for name, member in vars(protocol).items():
        if inspect.isfunction(member) and (not name.startswith("_") or name == "__call__"):
            out.append(_signature(member, "forward" if module and name == "__call__" else name))
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
    return lines


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def render(registry: Any) -> str:
    """docs/hooks.md for the techniques of ``registry`` (the generator passes ``builtin_registry()``)."""
    from . import hookspecs
    from .contracts import CAPABILITIES, LOOP_EVENTS, SLOT_CONTRACTS

    out = [
        "# Hooks, slots, capabilities, sites and parts",
        "",
        "The reference of everything a technique can plug into, generated from the code by",
        "`python tools/gen_hooks_doc.py` (a test fails when it is out of date; do not edit it by hand).",
        "`docs/writing-plugins.md` explains how to use each of these; `pgolf show NAME` prints one technique's",
        "parameters, sites and parts.",
        "",
        "## Hooks",
        "",
        f"pluggy hooks of project `{hookspecs.PROJECT}` (`pgolf_core.hookspecs`, `HOOKSPEC_VERSION = {hookspecs.HOOKSPEC_VERSION}`). "
        "A plugin module implements them with `@hookimpl` (`from pgolf import hookimpl`).",
        "",
    ]
    hooks = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("pgolf_") and callable(getattr(hookspecs, n))]
    hooks.sort(key=lambda f: f.__code__.co_firstlineno)
    rows = []
    for fn in hooks:
        historic = getattr(fn, f"{hookspecs.PROJECT}_spec", {}).get("historic")
        rows.append([_code(_signature(fn, drop_self=False, annotate=False)), _doc(fn) + (" (historic: a plugin registered later is called too)" if historic else "")])
    out += _table(["hook", "when / what"], rows)

    out += ["", "## Slots", "",
            "`pgolf_core.contracts.SLOT_CONTRACTS`, in pipeline order. A stack chooses one technique per slot "
            "(`modifier`: an ordered list); the core calls the technique's `build` and checks the result against "
            "the slot's protocol (`pgolf validate`, the contract test).", ""]
    rows = []
    for c in SLOT_CONTRACTS.values():
        rows.append([_code(c.name), _code(c.signature), _md(c.returns), _code(c.protocol.__name__), "yes" if c.required else "no"])
    out += _table(["slot", "build", "returns", "protocol", "required"], rows)
    for c in SLOT_CONTRACTS.values():
        out += ["", f"### `{c.name}`", "", _doc(c.protocol), ""]
        out += [f"- `{m}`" for m in protocol_members(c.protocol, module=c.returns.startswith("nn.Module"))]

    out += ["", "## Capabilities", "",
            "`pgolf_core.contracts.CAPABILITIES`: optional protocols. An object has one when it defines the methods; "
            "the pipeline checks with `isinstance`.", ""]
    rows = [[_code(name), "; ".join(_code(m) for m in protocol_members(p)), _doc(p)] for name, p in CAPABILITIES.items()]
    out += _table(["capability", "members", "what the pipeline does"], rows)

    out += ["", "## Loop events", "",
            "`pgolf_core.contracts.LOOP_EVENTS`: methods a built object may define (`method(state)`), called outside the "
            "compiled step on the schedule, averaging, quantizer, compressor and evaluator objects, then on the modifier "
            "objects in stack order, then through the matching pluggy hook.", ""]
    rows = [[_code(f"{e}(state)"), _code(f"pgolf_{e}"), _doc(getattr(hookspecs, f"pgolf_{e}"))] for e in LOOP_EVENTS]
    out += _table(["method", "hook", "when"], rows)

    out += render_hosts(registry)
    return "\n".join(out).rstrip() + "\n"


def render_hosts(registry: Any) -> list[str]:
    from .contracts import SLOT_CONTRACTS

    regs = registry.all()
    footprints = {r.technique.name: modifier_footprint(registry, r) for r in regs if r.technique.slot == "modifier"}
    used_by: dict[str, list[str]] = {}
    for name, fp in footprints.items():
        for where in (*fp.installs, *fp.replaces):
            used_by.setdefault(where, []).append(name)
        if fp.weight_transforms:
            used_by.setdefault("CastedLinear.weight_transform", []).append(name)
    out = [
        "", "## Sites and parts", "",
        "A *site* is a named place in a host module's forward where modifiers install modules of their own "
        "(`spec.install(slot, layer, site, factory, by=name)`); modules at one site run in stack order, each "
        "receiving the previous one's output as its first argument. A *part* is a sub-module a modifier may "
        "replace (`spec.replace(slot, layer, part, factory, by=name)`; one modifier per part). The signature is "
        "the host's `SITES` / `PARTS` entry. *Module at* is the state-dict name of an installed module "
        "(`{i}`: the layer, `{technique}`: the installing technique's name) or of the replacing part. *Used by*: "
        "the built-in modifiers that act there with the settings of their example stanza.",
    ]
    slot_order = list(SLOT_CONTRACTS)
    for reg in sorted(regs, key=lambda r: (slot_order.index(r.technique.slot), r.technique.name)):
        host = host_interface(registry, reg)
        if host is None or not (host.sites or host.parts):
            continue
        out += ["", f"### `{host.technique}` ({host.slot}: `{host.host}` at `{host.path}`)", ""]
        rows = [[_code(s), _code(sig), _code(host.site_path(s)), ", ".join(used_by.get(f"{host.slot}.{s}", []))] for s, sig in host.sites.items()]
        rows += [[_code(p) + " (part)", _code(sig), _code(host.part_path(p)), ", ".join(used_by.get(f"{host.slot}.{p}", []))] for p, sig in host.parts.items()]
        out += _table(["site / part", "signature", "module at", "used by"], rows)
    out += [
        "", "### `CastedLinear` (every linear layer of the built-in hosts)", "",
        "Not installed through the spec: a modifier sets `layer.weight_transform = module` on live layers in "
        "`attach(model)` (after init, before compile).", "",
    ]
    out += _table(
        ["site", "signature", "module at", "used by"],
        [[_code(s), _code(sig), _code(f"<layer>.{s}"), ", ".join(used_by.get(f"CastedLinear.{s}", []))] for s, sig in casted_linear_sites().items()],
    )
    out += ["", "## Built-in modifiers", "",
            "What each built-in modifier acts on with the settings of its example stanza (`pgolf show NAME` prints the same).", ""]
    rows = []
    for name, fp in footprints.items():
        rows.append([_code(name), "; ".join(fp.lines()) or "nothing in the spec"])
    out += _table(["modifier", "acts on"], rows)
    return out


def describe(registry: Any, registration: Any) -> tuple[HostInterface | None, Footprint | None, str | None]:
    """For ``pgolf list`` / ``pgolf show``: (host interface, modifier footprint, why discovery failed)."""
    try:
        if registration.technique.slot == "modifier":
            return None, modifier_footprint(registry, registration), None
        return host_interface(registry, registration), None, None
    except Exception as exc:  # a technique that does not build in the sample stack: say so, list the rest
        text = re.sub(r"\s+", " ", str(exc)).strip()
        return None, None, f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- what pgolf list / pgolf show print (here, not in the CLI modules, which every run loads and counts) ---------
def interface_fields(registry: Any, registration: Any) -> dict[str, Any]:
    """``pgolf list --json``'s ``sites`` and ``parts``: name → signature; empty for a technique that hosts nothing,
    None when it does not build in the sample stack."""
    host, _, error = describe(registry, registration) if registration.technique.slot != "modifier" else (None, None, None)
    if error:
        return {"sites": None, "parts": None}
    return {"sites": dict(host.sites) if host else {}, "parts": dict(host.parts) if host else {}}


def list_line(fields: dict[str, Any], name: str) -> str | None:
    """``pgolf list``'s line under a technique (``sites: qkv, heads_out, out; parts: rotary``), if any."""
    if fields["sites"] is None:
        return f"sites: ? (does not build in the sample stack; see 'pgolf show {name}')"
    shown = [f"{kind}: {', '.join(fields[kind])}" for kind in ("sites", "parts") if fields[kind]]
    return "; ".join(shown) or None


def show_lines(registry: Any, registration: Any) -> list[str]:
    """``pgolf show``'s lines: sites and parts with their signatures and where their modules sit in the state
    dict, or what a modifier acts on."""
    host, footprint, error = describe(registry, registration)
    if error:
        return [f"sites: not discovered: the technique does not build in the sample stack with its example ({error})"]
    out = []
    if host is not None and host.sites:
        out.append("sites [state-dict name of the modules installed there]:")
        out += [f"  {name}: {signature}  [{host.site_path(name)}]" for name, signature in host.sites.items()]
    if host is not None and host.parts:
        out.append("parts [state-dict name of the replacement]:")
        out += [f"  {name}: {signature}  [{host.part_path(name)}]" for name, signature in host.parts.items()]
    if footprint is not None:
        out += footprint.lines() or ["acts on: nothing in the model spec (loop events or build-time objects only)"]
    return out
