"""``python -m benchmarks.compare_runs``, the documented entry point of
:mod:`benchmarks.sweep.compare_runs` (moved there); its names stay importable from here."""

import sys

from benchmarks.sweep.compare_runs import *  # noqa: F403 - the same names as before the move
from benchmarks.sweep.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
