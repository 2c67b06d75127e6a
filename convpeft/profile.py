"""``python -m convpeft.profile``: the profile CLI under its older name; the same command as
``python -m convpeft.profiler`` (:mod:`convpeft.profiler.cli`)."""

import sys

from convpeft.profiler.cli import build_parser, check_args, main, prepare_model

__all__ = ["build_parser", "check_args", "main", "prepare_model"]

if __name__ == "__main__":
    sys.exit(main())
