"""What convpeft's command lines share (``python -m convpeft.plan``, ``python -m
convpeft.profiler``, ``python -m benchmarks.rank_sweep``): the argument types of comma-separated
lists and the help formatter, so that one flag spelled the same way parses the same way in
every command, and a bad value is refused by argparse with exit 2 and one line."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "blocks_list", "csv_list", "int_list"]


def csv_list(s: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [x.strip() for x in s.split(",") if x.strip()]


def int_list(s: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``."""
    try:
        return [int(x) for x in csv_list(s)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def blocks_list(s: str) -> list[int | None]:
    """Sparse-update block counts: ``"all,2,4"`` -> ``[None, 2, 4]`` (``all``: every layer
    trains; ``K``: only the last K blocks, K >= 0)."""
    out: list[int | None] = []
    for x in csv_list(s):
        if x.lower() == "all":
            out.append(None)
            continue
        try:
            k = int(x)
        except ValueError:
            k = -1
        if k < 0:
            raise argparse.ArgumentTypeError(
                f"expected 'all' and/or ints >= 0 (the last K blocks train), got {x!r}")
        out.append(k)
    if not out:
        raise argparse.ArgumentTypeError(f"no block count in {s!r}: e.g. 'all,2,4'")
    return out


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None/False ones (the help text says what those mean)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)
