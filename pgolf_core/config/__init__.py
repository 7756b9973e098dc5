"""Stack files: typed tables (attrs), strict structuring (cattrs), loading, overrides and errors."""

from .fields import param
from .load import load_stack
from .schema import Stack

__all__ = ["Stack", "load_stack", "param"]
