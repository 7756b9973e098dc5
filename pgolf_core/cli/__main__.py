"""``python -m pgolf_core.cli``, as when the CLI was a single module."""

import sys

from . import main

sys.exit(main())
