"""Public import name of pgolf: ``python -m pgolf …`` / ``torchrun -m pgolf run STACK``."""

from pgolf_core import __version__

__all__ = ["__version__"]
