"""``python -m benchmarks.plot``, the documented entry point of
:mod:`benchmarks.plots.make` (moved there); its names stay importable from here."""

import sys

from benchmarks.plots.make import *  # noqa: F403 - the same names as before the move
from benchmarks.plots.make import main

if __name__ == "__main__":
    sys.exit(main())
