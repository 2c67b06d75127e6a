"""Optimizers: conv-aware GaLore (:mod:`convpeft.optim.galore`).

Loaded lazily: ``galore_torch`` imports ``transformers``, which takes seconds, so
``import convpeft.optim`` stays cheap until a name below is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BASES",
    "PROJ_TYPES",
    "ConvGaLoreAdamW",
    "GaLoreRow",
    "GaLoreSummary",
    "galore_optimizer",
    "matrix_shape",
    "projected_shapes",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".galore", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
