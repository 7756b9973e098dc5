"""The guide and the commands stay true: docs/writing-plugins.md against the code, README against CI."""

from __future__ import annotations

import re

from conftest import REPO

from pgolf_core import hookspecs

GUIDE = (REPO / "docs" / "writing-plugins.md").read_text()


def _blocks(text: str, lang: str = "") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def test_guide_shows_the_loop_of_hookspecs():
    loop = hookspecs.__doc__.split("::\n\n", 1)[1].split("\n\nLoop events", 1)[0]
    expected = "\n".join(line[4:] for line in loop.splitlines()).strip()
    assert expected in [b.strip() for b in _blocks(GUIDE)], "docs/writing-plugins.md section 1: copy the loop from pgolf_core/hookspecs.py"


def test_guide_documents_every_hook_and_slot():
    hooks = [name for name in dir(hookspecs) if name.startswith("pgolf_")]
    assert hooks and all(f"`{h}`" in GUIDE or h in GUIDE for h in hooks), [h for h in hooks if h not in GUIDE]
    assert all(f"| `{slot}` |" in GUIDE for slot in hookspecs.SLOTS), [s for s in hookspecs.SLOTS if f"| `{s}` |" not in GUIDE]


def test_worked_example_is_the_shipped_example_plugin():
    module = (REPO / "examples" / "pgolf-example-plugin" / "pgolf_example_plugin" / "leaky_relu2.py").read_text()
    body = module.split("from __future__ import annotations", 1)[1]
    assert any(body.strip() in block for block in _blocks(GUIDE, "python")), "the guide's worked example differs from the example plugin"


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    command = readme.split("## Run the tests", 1)[1].split("```\n", 2)[1].strip()
    ci_last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command == ci_last
