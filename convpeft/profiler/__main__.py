"""``python -m convpeft.profiler``: profile one training update from the command line
(:mod:`convpeft.profiler.cli`)."""

import sys

from convpeft.profiler.cli import main

sys.exit(main())
