"""Measure the packed export of every bundled stack against the references' sizes; print the table of
``docs/export.md`` (``--write`` puts it there, between its markers).

    python tools/export_sizes.py [--write]

Columns: the packed ``train_gpt.py`` of ``pgolf export`` (the code every ``pgolf run`` counts); the reference
script packed the same way (python-minifier, raw LZMA2, base85 in the two-line ``exec`` wrapper; #1392 was
already minified); the reference's model bytes (its reported total minus the code it counted); and that model
with pgolf's code, against the 16,000,000-byte cap.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP = 16_000_000

# stack: (reference packed code bytes, reference model bytes, where the model bytes come from)
REFERENCES = {
    "baseline": (10_821, 15_815_847, "records/.../NaiveBaseline: 15,863,489 total − 47,642 code"),
    "pr315": (None, None, "not measured; the reported 15,612,308 total bounds it"),
    "pr400": (16_816, 15_495_151, "15,581,348 total − 86,197 code (its Code size line)"),
    "pr450": (None, 14_023_633, "14,104,510 total − 80,877 code (its Code size line)"),
    "pr1019": (20_268, 15_883_000, "~15,883,000: 15,984,850 max total less its code"),
    "pr1392": (27_454, 15_799_271, "its Serialized model line"),
    "pr1319": (None, 15_611_244, "15,690,779 total − 79,535 code (its Code size line)"),
    "pr1218": (None, 15_859_576, "largest seed (2025): 15,927,782 total − 68,206 code"),
    "pr1285": (21_396, 15_946_087, "largest seed (42): 15,967,483 total − 21,396 code (its wrapper)"),
    "pr1394": (15_516, 15_973_467, "largest seed (42): 15,988,983 total − 15,516 code (its wrapper)"),
    "pr1493": (16_594, 15_976_638, "largest seed (999): 15,993,232 total − 16,594 code (its wrapper)"),
}
BEGIN, END = "<!-- export-sizes:begin -->", "<!-- export-sizes:end -->"


def measure() -> list[dict]:
    from pgolf_core.config import load_stack
    from pgolf_core.export import code_bytes
    from pgolf_core.registry import default_registry

    registry = default_registry()
    rows = []
    for name, (ref_packed, ref_model, source) in REFERENCES.items():
        stack = load_stack(REPO / "stacks" / f"{name}.toml", registry)
        ours = code_bytes(stack, registry)
        bound = ref_model if ref_model is not None else stack.meta.reported_bytes
        rows.append({"stack": name, "ours": ours, "ref_packed": ref_packed, "ref_model": ref_model, "source": source,
                     "total": bound + ours, "bounded": ref_model is None})
    return rows


def _n(value) -> str:
    return "–" if value is None else f"{value:,}"


def table(rows: list[dict]) -> str:
    lines = [
        "| stack | pgolf packed `train_gpt.py` | reference packed | reference model bytes | model + pgolf code | under the cap |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        total = f"≤ {r['total']:,}" if r["bounded"] else f"{r['total']:,}"
        lines.append(
            f"| {r['stack']} | {r['ours']:,} | {_n(r['ref_packed'])} | {_n(r['ref_model'])} | {total} | "
            f"{'yes' if r['total'] <= CAP else 'NO'} ({CAP - r['total']:+,}) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/export.md")
    args = parser.parse_args()
    text = table(measure())
    print(text)
    if args.write:
        doc = REPO / "docs" / "export.md"
        body = doc.read_text()
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{text}\n{END}", body, flags=re.S)
        doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
