"""Write docs/hooks.md, the reference of hooks, slots, capabilities, loop events, sites and parts, from the code.

    python tools/gen_hooks_doc.py            # rewrite docs/hooks.md
    python tools/gen_hooks_doc.py --check    # exit 1 if docs/hooks.md is out of date

Only pgolf's own techniques are described (installed plugins are not loaded); see pgolf_core/hooks_doc.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf_core.hooks_doc import builtin_registry, render

TARGET = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file is current")
    args = parser.parse_args(argv)
    text = render(builtin_registry())
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET} is out of date; run: python tools/gen_hooks_doc.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
