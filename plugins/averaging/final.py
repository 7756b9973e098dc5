"""No weight averaging: export the weights as they are after the last step (official baseline)."""

from __future__ import annotations

import attrs

from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class FinalWeightsParams:
    """No parameters."""


class FinalWeights:
    def export_weights(self, model):
        return model.state_dict()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(params: FinalWeightsParams, ctx) -> FinalWeights:
    return FinalWeights()


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="none",
            slot="averaging",
            params=FinalWeightsParams,
            build=build,
            summary="no averaging: export the final weights (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[averaging]\nuse = "none"',
            # The #315-line scripts average by default (SWA_ENABLED defaults to 1): no averaging is said explicitly.
            select_env={"EMA_ENABLED": "0", "SWA_ENABLED": "0", "TIGHT_SWA": "0"},
        )
    )
