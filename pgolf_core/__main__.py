"""``python -m pgolf_core`` (what ``pgolf run --nproc-per-node N`` hands to torchrun)."""

import sys

from .cli import main

sys.exit(main())
