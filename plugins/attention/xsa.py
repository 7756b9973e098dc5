"""XSA (exclusive self attention) on selected layers: subtract each head output's projection on the
token's own value vector, ``y <- y - (y . v_hat) v_hat``.

Introduced to the challenge in the 11-layer records (arXiv:2603.09078), used on the last 4 layers by the
#315 record (``2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248``) and PRs #400/#450. PR #400 adds an
optional learnable gate ``y <- y + sigmoid(g) (y_xsa - y)`` (off in its run).
"""

from __future__ import annotations

import attrs

from pgolf_core.config.fields import param
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class XSAParams:
    learnable_gate: bool = param(False, help="interpolate with a learned sigmoid gate (PR #400 option)", env="XSA_LEARNABLE_GATE")
    gate_init: float = param(2.0, help="initial gate logit when learnable_gate", env="XSA_GATE_INIT")


class XSA:
    def __init__(self, params: XSAParams) -> None:
        self.params = params

    def transform(self, spec, layers, name) -> None:
        for i in layers:
            spec.claim("attention", i, "xsa", self.params, by=name)


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="xsa",
            slot="modifier",
            params=XSAParams,
            build=lambda params, ctx: XSA(params),
            summary="exclusive self attention: remove the own-value component from attention outputs",
            source="https://github.com/openai/parameter-golf/pull/315",
            example='[[modifier]]\nuse = "xsa"\nlayers = "last 4"',
            layers_env={"XSA_LAST_N": lambda v: f"last {int(v)}"},
        )
    )
