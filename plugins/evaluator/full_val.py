"""Final evaluation over the whole validation split in non-overlapping ``train_seq_len`` windows.

The official baseline ``train_gpt.py`` scores its round-tripped artifact this way and prints
``final_int8_zlib_roundtrip_exact val_loss:… val_bpb:…``; ``label`` sets that line's name.
``compliance_for(line)`` says why that line is within the rules.
"""

from __future__ import annotations

import time

import attrs

from pgolf_core.compliance import matches_label
from pgolf_core.contracts import Compliance, FinalResult
from pgolf_core.config.fields import param
from pgolf_core.evaluate import eval_val
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class FullValParams:
    label: str = param(
        "final_{quant}_{comp}_roundtrip",
        help="name of the final log line; {quant} and {comp} are the quantizer's and compressor's labels",
    )


class FullVal:
    compliance_note = "scores each validation token once, after training, with the frozen model"

    def __init__(self, params: FullValParams, train_seq_len: int) -> None:
        self.label = params.label
        self.eval_seq_len = train_seq_len  # non-overlapping windows of the training length

    def evaluate(self, model, env, quant: str, comp: str) -> list[FinalResult]:
        t0 = time.perf_counter()
        val_loss, val_bpb = eval_val(model, env)
        return [FinalResult(self.label.format(quant=quant, comp=comp), val_loss, val_bpb, 1000.0 * (time.perf_counter() - t0))]

    def reported_lines(self, quant: str, comp: str) -> list[str]:
        """The final line names ``evaluate`` will log (``pgolf validate`` checks them against the rules)."""
        return [self.label.format(quant=quant, comp=comp)]

    def compliance_for(self, line_name: str) -> Compliance:
        """The rule check of the reported line (``line_name`` as logged, with or without ``_exact``)."""
        if matches_label(self.label, line_name):
            return Compliance(line_name, True, self.compliance_note)
        raise KeyError(f"{line_name!r} is not a line the full_val evaluator reports")


def build(params: FullValParams, ctx) -> FullVal:
    return FullVal(params, ctx.data.train_seq_len)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="full_val",
            slot="evaluator",
            params=FullValParams,
            build=build,
            summary="whole validation split, non-overlapping windows of train_seq_len (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[evaluator]\nuse = "full_val"',
        )
    )
