"""Reading the challenge's log line formats back into numbers (pgolf's logs and the reference scripts')."""

from __future__ import annotations

import re
from typing import Any

_TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:([-\d.naninf]+)")
_VAL = re.compile(r"^step:(\d+)/\d+ val_loss:([-\d.naninf]+) val_bpb:([-\d.naninf]+)")
_FINAL = re.compile(r"^(final_\w+_exact) val_loss:([-\d.naninf]+) val_bpb:([-\d.naninf]+)")
_STEP_AVG = re.compile(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms step_avg:([\d.]+)ms")
_PARAMS = re.compile(r"^model_params:(\d+)")


def parse_log(text: str) -> dict[str, Any]:
    """``{"train_loss": {step: loss}, "val": {step: (loss, bpb)}, "finals": {name: (loss, bpb)}, ...}``."""
    out: dict[str, Any] = {"train_loss": {}, "val": {}, "finals": {}, "step_avg_ms": {}, "params": None}
    for line in text.splitlines():
        line = line.strip()
        if m := _TRAIN.match(line):
            out["train_loss"][int(m.group(1))] = float(m.group(2))
        if m := _STEP_AVG.match(line):
            out["step_avg_ms"][int(m.group(1))] = float(m.group(3))
        if m := _VAL.match(line):
            out["val"][int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
        if m := _FINAL.match(line):
            out["finals"][m.group(1)] = (float(m.group(2)), float(m.group(3)))
        if m := _PARAMS.match(line):
            out["params"] = int(m.group(1))
    return out
