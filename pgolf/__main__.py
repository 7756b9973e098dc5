"""``python -m pgolf`` and ``torchrun --nproc_per_node N -m pgolf run STACK``."""

import sys

from pgolf_core.cli import main

sys.exit(main())
