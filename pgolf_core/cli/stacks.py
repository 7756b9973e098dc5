"""``pgolf stacks``: the bundled stacks, their reported val_bpb, and whether that score is within the challenge's
rules, so a score like PR #1319's 0.6951 (SLOT, fitted on the tokens it scores) never reads as a record."""

from __future__ import annotations

import argparse

from ..config.bundled import bundled_dir
from .common import registry_for


def stack_compliance(path, registry) -> tuple[str, str]:
    """``(mark, note)`` for the score a stack reports: the rule check of its evaluator's last final line (the
    line a PR headlines) and its quantizer's calibration source. ``?`` when the stack does not resolve here."""
    from ..config import load_stack
    from ..errors import PgolfError
    from ..compliance import final_line_compliance, quantizer_compliance
    from ..train import build_slot

    try:
        stack = load_stack(path, registry)
        built = {slot: build_slot(stack, registry, slot) for slot in ("evaluator", "quantizer", "compressor")}
    except (PgolfError, Exception) as exc:  # a plugin missing here: say so rather than fail the listing
        text = "; ".join(exc.problems) if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        return "?", f"does not resolve here: {text}"
    evaluator, quantizer, compressor = built["evaluator"], built["quantizer"], built["compressor"]
    lines = evaluator.reported_lines(quantizer.label, compressor.label)
    checks = list(final_line_compliance(evaluator, lines).values())
    headline = checks[-1] if checks else None
    bad = [c for c in ([headline] if headline else []) + quantizer_compliance(quantizer) if not c.ok]
    if not bad:
        return "yes", ""
    allowed = [c.what for c in checks if c.ok]
    also = f"; within the rules: {', '.join(allowed)}" if allowed else ""
    return "NO", "; ".join(f"{c.what}: {c.reason}" for c in bad) + also


def cmd_stacks(args: argparse.Namespace) -> int:
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    registry = registry_for(args)
    rows, notes = [], []
    for path in sorted(bundled_dir().glob("*.toml")):
        meta = tomllib.loads(path.read_text(encoding="utf-8")).get("meta", {})
        bpb = meta.get("reported_val_bpb")
        mark, note = stack_compliance(path, registry)
        rows.append((path.stem, str(bpb) if bpb is not None else "-", mark, meta.get("description", "")))
        if note:
            notes.append(f"{path.stem}: {note}")
    head = ("stack", "reported val_bpb", "within the rules", "recipe")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    for note in notes:
        print(f"note: {note}")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    stacks = sub.add_parser("stacks", parents=[common], help="bundled stacks, their reported val_bpb and whether it is within the rules")
    stacks.set_defaults(func=cmd_stacks)
