"""Techniques own their code: the core never names one, empty sites add nothing, parameter roles reproduce the
references' name lists, every slot's object meets its contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from conftest import REPO, STACKS, reference_roles
from pgolf.testing import installed_registry
from pgolf_core.config import load_stack
from pgolf_core.contracts import SLOT_CONTRACTS
from pgolf_core.model.gpt import build_model
from pgolf_core.model.roles import CONTROL, parameter_roles
from pgolf_core.model.sites import Site

REGISTRY = installed_registry()
CORE = REPO / "pgolf_core"
BUNDLED = sorted(p.stem for p in STACKS.glob("*.toml"))

# Plain words that are also the names of techniques; in the core they mean the word (an environment value
# "none", the "slot" column of a listing, the "baseline" side of a significance test).
WORDS = {"none", "slot", "baseline", "token"}  # technique names that are also plain words (a lock's "token" key)


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node, clean=False):
            out.add(id(node.body[0].value))
    return out


def test_the_core_never_names_or_imports_a_technique():
    names = {r.technique.name for r in REGISTRY.all()} - WORDS
    found = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgolf.plugins"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("pgolf.plugins") for a in node.names):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} imports a technique module")
    assert not found, found


def test_a_stack_without_modifiers_builds_no_site_and_no_part():
    with torch.device("meta"):
        model, _ = build_model(load_stack(STACKS / "baseline.toml", REGISTRY), REGISTRY)
    assert not [n for n, m in model.named_modules() if isinstance(m, Site)]
    assert all(b.wiring is None and b.attn_in is None and b.attn.qkv is None and b.attn.heads_out is None for b in model.blocks)
    assert model.topology.schedule is None and model.topology.decoder is None
    assert sum(p.numel() for p in model.parameters()) == 17_059_912  # the official baseline's count


# The names the references gave these tensors, for their CONTROL_TENSOR_NAME_PATTERNS.
REFERENCE_NAMES = ((".lookup.bigram_hash.", ".bigram."), (".x0.smeargate.", ".smear."), (".heads_out.xsa.gate", ".xsa_gate"),
                   (".wiring.resid_mix_mlp", ".resid_mix_mlp"))


def _reference_name(name: str) -> str:
    for new, old in REFERENCE_NAMES:
        name = name.replace(new, old)
    return name


@pytest.mark.parametrize("stack_name", BUNDLED)
def test_parameter_roles_reproduce_the_references_control_tensors(stack_name):
    stack = load_stack(STACKS / f"{stack_name}.toml", REGISTRY)
    with torch.device("meta"):
        model, _ = build_model(stack, REGISTRY)
    roles = parameter_roles(model)
    ours = {n for n, r in roles.items() if r == CONTROL}
    theirs = {n for n, r in reference_roles({n: _reference_name(n) for n in roles}.values()).items() if r == CONTROL}
    assert {_reference_name(n) for n in ours} == theirs
    assert ours  # every stack has the baseline's gains and mixes


def test_parameter_roles_of_the_lane_and_gate_variants():
    """Techniques no bundled stack uses still mark what the references' lists matched (and nothing else)."""
    mods = 'modifier=[{use="xsa", layers="last 2", learnable_gate=true}, {use="two_lane_parallel", layers="9:"}]'
    stack = load_stack(STACKS / "pr315.toml", REGISTRY, overrides=[mods])
    with torch.device("meta"):
        model, _ = build_model(stack, REGISTRY)
    control = {n for n, r in parameter_roles(model).items() if r == CONTROL}
    assert "blocks.10.attn.heads_out.xsa.gate" in control and "blocks.9.wiring.resid_mix_mlp" in control
    assert "blocks.9.wiring.route" not in control and "topology.decoder.lane_merge" not in control


@pytest.mark.parametrize("stack_name", BUNDLED)
def test_every_slot_object_meets_its_contract(stack_name):
    from pgolf_core.train import build_slot

    stack = load_stack(STACKS / f"{stack_name}.toml", REGISTRY)
    with torch.device("meta"):
        model, modifiers = build_model(stack, REGISTRY)
    modules = {"embedding": model.embedding, "attention": model.blocks[0].attn, "mlp": model.blocks[0].mlp,
               "residual": model.blocks[0], "topology": model.topology, "head": model.head, "loss": model.loss}
    for slot, contract in SLOT_CONTRACTS.items():
        if slot == "modifier":
            assert all(contract.accepts(m) for m in modifiers)
            continue
        obj = modules[slot] if slot in modules else build_slot(stack, REGISTRY, slot)
        assert contract.accepts(obj), f"{stack_name}: {slot} {type(obj).__name__}"


def test_public_api_resolves():
    import pgolf

    for name in pgolf.__all__:
        assert getattr(pgolf, name) is not None
    with pytest.raises(AttributeError):
        pgolf.not_a_name  # noqa: B018


def test_plugin_folders_match_the_packaged_list():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"pgolf.plugins." + p.name for p in (REPO / "plugins").iterdir() if (p / "__init__.py").is_file()}
    assert folders <= listed and {n for n in listed if n.startswith("pgolf.plugins.")} <= folders | {"pgolf.plugins"}
    core = {"pgolf_core." + p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()} | {"pgolf_core"}
    assert core <= listed, core - listed
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["pgolf"]
    modules = {str(p.relative_to(REPO / "plugins").with_suffix("")).replace("/", ".") for p in (REPO / "plugins").rglob("*.py")}
    for target in entry_points.values():
        assert target.removeprefix("pgolf.plugins.") in modules, target


def test_modules_at_sites_draw_their_weights_under_a_banked_init():
    """A banked init writes the hosts' own matrices, so they are built without a draw; a modifier's module at a
    site is built normally (drawn from the seeded RNG, not left as allocated), as the records that add such
    modules (e.g. attention gates) built them."""
    import types

    import attrs

    from pgolf import CastedLinear, Technique, hookimpl
    from pgolf.testing import fresh_registry, tiny_model

    class Probe(torch.nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.proj = CastedLinear(dim, 3, bias=False)  # neither zero-init nor large enough for the orthogonal rule

        def forward(self, y, x, aux=None):
            return y + 0 * self.proj(x).sum()

    class Adds:
        def transform(self, spec, layers, name):
            for i in layers:
                spec.install("attention", i, "out", lambda host: Probe(host.dim), by=name)

    @attrs.define(frozen=True, kw_only=True)
    class NoParams:
        pass

    plugin = types.ModuleType("probe_plugin")

    @hookimpl
    def pgolf_register_techniques(register):
        register(Technique(name="probe", slot="modifier", params=NoParams, build=lambda p, c: Adds(), summary="t", example='[[modifier]]\nuse = "probe"'))

    plugin.pgolf_register_techniques = pgolf_register_techniques
    registry = fresh_registry(plugin)
    extra = '[init]\nuse = "banked_orthogonal"\n[optimizer]\nuse = "parallel_muon"\n[[modifier]]\nuse = "probe"\nlayers = [1]'
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _, _ = tiny_model(registry, extra=extra, seed=0)
        weights.append(model.blocks[1].attn.out["probe"].proj.weight.detach().clone())
    bound = 1 / 64 ** 0.5  # kaiming-uniform's bound for fan_in 64
    assert torch.equal(weights[0], weights[1]) and 0 < weights[0].abs().max() <= bound
