"""``python -m benchmarks.rank_sweep``, the documented entry point of
:mod:`benchmarks.sweep.runner` (moved there); its names stay importable from here."""

import sys

from benchmarks.sweep.runner import *  # noqa: F403 - the same names as before the move
from benchmarks.sweep.runner import main

if __name__ == "__main__":
    sys.exit(main())
