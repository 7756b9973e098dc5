"""The guide and the commands stay true: docs/writing-plugins.md and docs/hooks.md against the code, README
against CI. The guide's examples are the shipped files or run through the technique contract."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch
from conftest import REPO

from pgolf.testing import build_slot, check_technique_contract, cpu_runtime, fresh_registry, tiny_model, tiny_stack
from pgolf_core import hookspecs, hooks_doc
from pgolf_core.contracts import SLOT_CONTRACTS

GUIDE = (REPO / "docs" / "writing-plugins.md").read_text()
GATE = REPO / "examples" / "pgolf-attention-gate"


def _blocks(text: str, lang: str | None = None) -> list[str]:
    """The fenced code blocks of a markdown text (of one language when ``lang`` is given), without the fences."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE) if lang is None or tag == lang]


def _guide_module(marker: str, name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The guide's python block that registers ``marker``, executed as a module (importable while the test runs)."""
    (code,) = [b for b in _blocks(GUIDE, "python") if marker in b and "def pgolf_register_techniques" in b]
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)  # attrs resolves the string annotations through sys.modules
    exec(compile(code, f"docs/writing-plugins.md:{name}", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def builtins():
    return hooks_doc.builtin_registry()


def test_guide_shows_the_loop_of_hookspecs():
    loop = hookspecs.__doc__.split("::\n\n", 1)[1].split("\n\nLoop events", 1)[0]
    expected = "\n".join(line[4:] for line in loop.splitlines()).strip()
    assert expected in [b.strip() for b in _blocks(GUIDE)], "docs/writing-plugins.md section 1: copy the loop from pgolf_core/hookspecs.py"


def test_guide_documents_every_hook_and_slot():
    hooks = [name for name in dir(hookspecs) if name.startswith("pgolf_")]
    assert len(hooks) == 9 and [h for h in hooks if f"`{h}" not in GUIDE] == []
    rows = {line for line in GUIDE.splitlines() if line.startswith("| `")}
    missing = [c.name for c in SLOT_CONTRACTS.values() if f"| `{c.name}` | `{c.signature}` | {c.returns} |" not in rows]
    assert missing == [], f"section 1's slot table differs from pgolf_core.contracts.SLOT_CONTRACTS for {missing}"


def test_guide_lists_every_site_and_part_of_the_built_in_hosts(builtins):
    hosts = [h for h in (hooks_doc.host_interface(builtins, r) for r in builtins.all()) if h is not None and (h.sites or h.parts)]
    assert {h.slot for h in hosts} == {"embedding", "attention", "mlp", "residual", "topology"}
    rows = [line for line in GUIDE.splitlines() if line.startswith(("| `token`", "| `gqa`", "| `relu2`", "| `resid_mix`", "| `unet`", "| `gated_unet`"))]
    expected = []
    for h in hosts:
        expected += [f"| `{h.technique}` ({h.slot}) | `{s}` | `{sig}` | `{h.site_path(s)}` |" for s, sig in h.sites.items()]
        expected += [f"| `{h.technique}` ({h.slot}) | `{p}` (part) | `{sig}` | `{h.part_path(p)}` |" for p, sig in h.parts.items()]
    assert sorted(rows) == sorted(expected), "section 2's host table differs from the hosts' SITES/PARTS"
    assert f"`weight_transform`, `{hooks_doc.casted_linear_sites()['weight_transform']}`" in GUIDE


def test_guide_state_dict_names_are_what_a_build_gives():
    model, _, _ = tiny_model(fresh_registry(), extra='[[modifier]]\nuse = "xsa"\nlearnable_gate = true\n[[modifier]]\nuse = "canon"\npositions = "D"')
    names = set(dict(model.named_parameters()))
    assert {"blocks.3.attn.heads_out.xsa.gate", "blocks.0.mlp.hidden_site.canon.conv.weight"} <= names
    assert "`blocks.3.attn.heads_out.xsa.gate`" in GUIDE and "`blocks.0.mlp.hidden_site.canon.conv.weight`" in GUIDE


def test_hooks_reference_is_generated_from_the_code(builtins):
    committed = (REPO / "docs" / "hooks.md").read_text()
    assert committed == hooks_doc.render(builtins), "docs/hooks.md is out of date: run python tools/gen_hooks_doc.py"


def test_attention_gate_example_is_the_shipped_package():
    blocks = [b.strip() for b in _blocks(GUIDE)]
    for path in ("pgolf_attention_gate/output_gate.py", "pyproject.toml", "stacks/sample_gated.toml"):
        assert (GATE / path).read_text().strip() in blocks, f"the guide's copy of examples/pgolf-attention-gate/{path} differs"
    module = (GATE / "pgolf_attention_gate" / "output_gate.py").read_text()
    assert "pgolf_core" not in module, "the example uses the public API (from pgolf import ...) only"


def test_guide_swiglu_meets_the_contract_and_hosts_canon(monkeypatch):
    registry = fresh_registry(_guide_module('name="swiglu"', "guide_swiglu", monkeypatch))
    check_technique_contract(registry, registry.get("mlp", "swiglu"))
    model, _, stack = tiny_model(registry, extra='[mlp]\nuse = "swiglu"\n[[modifier]]\nuse = "canon"\npositions = "D"')
    conv = model.blocks[0].mlp.hidden_site["canon"].conv
    assert conv.in_channels == model.blocks[0].mlp.hidden == int(1.5 * stack.model.model_dim)
    assert tuple(model.blocks[0].mlp.fc.weight.shape) == (2 * conv.in_channels, stack.model.model_dim)


def test_guide_compressor_meets_the_contract_and_names_the_final_line(monkeypatch):
    registry = fresh_registry(_guide_module('name="bz2"', "guide_bz2", monkeypatch))
    check_technique_contract(registry, registry.get("compressor", "bz2"))
    stack = tiny_stack(registry, 'compressor={use="bz2"}')
    quantizer, compressor = build_slot(stack, registry, "quantizer"), build_slot(stack, registry, "compressor")
    (line,) = build_slot(stack, registry, "evaluator").reported_lines(quantizer.label, compressor.label)
    assert line == "final_int8_bz2_roundtrip" and f"`{line} val_loss" in GUIDE
    obj = {"__quant_format__": "x", "quantized": {"w": torch.arange(6, dtype=torch.int8)}}
    back = compressor.decompress(compressor.compress(obj))  # receives the structured object, not bytes
    assert back["__quant_format__"] == "x" and torch.equal(back["quantized"]["w"], obj["quantized"]["w"])


def _groups(optimizer_set, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for g in opt.param_groups for p in g["params"]} for opt in optimizer_set.optimizers]


def test_parameter_roles_table_is_what_the_optimizers_do():
    extra = ('[[modifier]]\nuse = "bigram_hash"\n[[modifier]]\nuse = "xsa"\nlearnable_gate = true\n'
             '[[modifier]]\nuse = "depth_recurrence"\nlayers = [1]\n[[modifier]]\nuse = "canon"\npositions = "C"')
    registry = fresh_registry()
    model, _, stack = tiny_model(registry, extra=extra)
    muon = build_slot(stack, registry, "optimizer")(model, cpu_runtime())
    token, matrix, scalar = _groups(muon, model)
    assert "blocks.0.attn.c_q.weight" in matrix and "embedding.lookup.bigram_hash.proj.weight" in matrix  # 2-D, in or outside
    assert {"embedding.tok_emb.weight", "embedding.lookup.bigram_hash.embed.weight"} <= token  # nn.Embedding outside
    assert {"blocks.3.attn.heads_out.xsa.gate", "topology.skip_weights", "blocks.0.mlp_in.canon.conv.weight"} <= scalar
    trained = token | matrix | scalar
    assert "topology.schedule.scales.0" in dict(model.named_parameters()) and "topology.schedule.scales.0" not in trained  # frozen

    model, _, stack = tiny_model(registry, 'optimizer={use="parallel_muon"}', extra=extra)
    banked = build_slot(stack, registry, "optimizer")(model, cpu_runtime())
    token, banks, scalar = _groups(banked, model)
    assert "embedding.lookup.bigram_hash.proj.weight" in scalar and "embedding.lookup.bigram_hash.embed.weight" in token
    assert {"blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight"} <= banks and "topology.schedule.scales.0" not in token | banks | scalar
    assert "(BigramHash and value-embedding projections) | scalar AdamW |" in GUIDE


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    command = readme.split("## Run the tests", 1)[1].split("```\n", 2)[1].strip()
    ci_last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command == ci_last
