"""``python -m benchmarks.findings``, the documented entry point of
:mod:`benchmarks.sweep.findings` (moved there); its names stay importable from here."""

import sys

from benchmarks.sweep.findings import *  # noqa: F403 - the same names as before the move
from benchmarks.sweep.findings import main

if __name__ == "__main__":
    sys.exit(main())
