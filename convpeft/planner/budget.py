"""Memory budgets as people write them: ``"512MiB"``, ``"1.5GB"``, ``"300M"`` or bytes.

Budgets (:func:`parse_budget`) are bytes, or a number with a unit: ``kB``/``MB``/``GB``/``TB``
are powers of 1000 and ``KiB``/``MiB``/``GiB``/``TiB`` (also ``Ki``/``Mi``/``Gi``/``Ti``) powers
of 1024; a bare ``K``/``M``/``G``/``T`` is the SI unit (``300M`` = 300 MB = 300,000,000 bytes,
as in Kubernetes). Units are case-insensitive (``mib`` = ``MiB``); bits are not supported.
The number is read as a ``Decimal`` so that ``1.1GB`` is exactly 1,100,000,000 bytes, not a
float's rounding of it. :func:`format_bytes` is the way back, for tables and titles.
"""

from __future__ import annotations

import re
from decimal import Decimal, DecimalException

_UNIT_BYTES: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNIT_BYTES[_p] = _UNIT_BYTES[_p + "b"] = 1000**_i
    _UNIT_BYTES[_p + "i"] = _UNIT_BYTES[_p + "ib"] = 1024**_i
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
MAX_BUDGET = 2**63 - 1  # bytes; larger budgets are typos (and overflow float formatting)
MAX_BUDGET_TEXT = "2**63 bytes (8 EiB)"
_UNIT_HELP = ("use bytes, or a number with a unit: kB/MB/GB/TB (powers of 1000; K/M/G/T alone "
              "mean the same) or KiB/MiB/GiB/TiB (powers of 1024), e.g. 512MiB or 1.5GB")


def parse_budget(budget: str | int) -> int:
    """Bytes of a budget such as ``"512MiB"``, ``"1.5GB"``, ``"300M"``, ``"2GiB"`` or ``4096``.

    See the module docstring for the units; fractional bytes are dropped. ``ValueError``
    (saying what to write instead) for anything else, a budget below one byte or one above
    :data:`MAX_BUDGET` (2**63 - 1 bytes).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ValueError(f"budget must be a string or an int number of bytes (got {budget!r})")
    if isinstance(budget, int):
        n = budget
    else:
        m = _BUDGET_RE.match(budget)
        if m is None:
            raise ValueError(f"cannot read budget {budget!r}; {_UNIT_HELP}")
        unit = m.group(2).lower()
        if unit not in _UNIT_BYTES:
            raise ValueError(f"budget {budget!r}: unknown unit {m.group(2)!r}; {_UNIT_HELP}")
        try:
            n = int(Decimal(m.group(1)) * _UNIT_BYTES[unit])
        except (DecimalException, OverflowError):  # decimal.Overflow for 1e999999GB
            raise ValueError(f"budget {budget!r} is larger than {MAX_BUDGET_TEXT}, more than "
                             "any device has; give the device's memory, e.g. 80GiB") from None
    if n < 1:
        raise ValueError(f"budget must be at least 1 byte (got {budget!r})")
    if n > MAX_BUDGET:
        raise ValueError(f"budget {budget!r} is larger than {MAX_BUDGET_TEXT}, more than any "
                         "device has; give the device's memory, e.g. 80GiB")
    return n


def format_bytes(n: int) -> str:
    """``n`` bytes in MiB (GiB from 10 GiB on), e.g. ``"512.0 MiB"``."""
    return f"{n / 2**30:,.1f} GiB" if abs(n) >= 10 * 2**30 else f"{n / 2**20:,.1f} MiB"
