"""`python -m fedshield.cli` runs the `fedshield` command (site workers are started this way)."""

import sys

from .commands import main

sys.exit(main())
