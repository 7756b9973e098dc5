"""The challenge's rules, checked per technique: each final line an evaluator reports, and each quantizer's
calibration source, carries a ``Compliance`` verdict (``pgolf validate`` prints them before anything runs;
a run logs them and ``submission.json`` takes the last compliant score)."""

from __future__ import annotations

import re
from typing import Any

from .contracts import Calibrating, Compliance, Evaluator


def matches_label(template: str, name: str) -> bool:
    """Whether ``name`` (optionally with the log's ``_exact`` suffix) is ``template`` with its ``{quant}`` and
    ``{comp}`` fields filled in."""
    pattern = re.escape(template).replace(re.escape("{quant}"), r"\S+?").replace(re.escape("{comp}"), r"\S+?")
    return any(re.fullmatch(pattern, n) for n in (name, name.removesuffix("_exact")))


def final_line_compliance(evaluator: Evaluator, names: list[str]) -> dict[str, Compliance]:
    """Each final line's rule check, from the evaluator's ``compliance_for``."""
    return {name: evaluator.compliance_for(name) for name in names}


def quantizer_compliance(quantizer: Any) -> list[Compliance]:
    """The verdicts on a calibrating quantizer's data sources (none for one that does not calibrate)."""
    return list(quantizer.compliance) if isinstance(quantizer, Calibrating) else []
