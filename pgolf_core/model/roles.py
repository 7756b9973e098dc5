"""Parameter roles: what a parameter is for, declared by the module that creates it.

The reference scripts decide by *name* which tensors are small "control" tensors (a substring list,
``CONTROL_TENSOR_NAME_PATTERNS``, that grew with every record). pgolf lets the owner say it instead, so a
technique in its own package needs no entry in a core list and no particular naming:

* ``control(p)``: a gain, mix or gate vector. Kept in fp32 when the body runs in bf16, optimised with the
  scalar (Adam) group rather than Muon, and exported unquantized.
* ``frozen(p)``: in no optimizer group (PR #1392's recurrence blend vectors); data-parallel wrappers are
  told not to wait for its gradient.

Anything unmarked is an ordinary weight. Roles are stored on the ``Parameter`` object, which survives
``.to()``, ``.float()`` and ``torch.compile`` (they replace ``.data``, not the parameter).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

CONTROL = "control"
FROZEN = "frozen"
WEIGHT = "weight"

_ATTR = "_pgolf_role"


def control(p: nn.Parameter) -> nn.Parameter:
    """Mark ``p`` as a control tensor (fp32, scalar optimizer group, stored unquantized); returns ``p``."""
    setattr(p, _ATTR, CONTROL)
    return p


def frozen(p: nn.Parameter) -> nn.Parameter:
    """Mark ``p`` as trained by no optimizer; returns ``p``."""
    setattr(p, _ATTR, FROZEN)
    return p


def role(p: nn.Parameter) -> str:
    return getattr(p, _ATTR, WEIGHT)


def is_control(p: nn.Parameter) -> bool:
    return role(p) == CONTROL


def is_frozen(p: nn.Parameter) -> bool:
    return role(p) == FROZEN


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """State-dict name → role of every parameter of ``model`` (what quantizers receive with the weights)."""
    return {name: role(p) for name, p in model.named_parameters()}


def control_names(roles: Mapping[str, str]) -> frozenset[str]:
    return frozenset(name for name, r in roles.items() if r == CONTROL)
