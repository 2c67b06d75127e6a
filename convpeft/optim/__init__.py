"""Optimizers: conv-aware GaLore, split as galore-torch splits it.

* :mod:`.galore`: :func:`galore_optimizer` (which weights are projected) and
  :class:`ConvGaLoreAdamW` (galore-torch's AdamW step on 2-D views of conv weights);
* :mod:`.projector`: the matrix a weight is projected as and the glue around galore-torch's
  ``GaLoreProjector``;
* :mod:`.summary`: :class:`GaLoreSummary` rows and the FLOP / state-bytes cost model.

Loaded lazily: ``galore_torch`` imports ``transformers``, which takes seconds, so
``import convpeft.optim`` stays cheap until a name below is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ConvGaLoreAdamW": ".galore",
    "GaLoreSettings": ".galore",
    "galore_optimizer": ".galore",
    "PROJ_TYPES": ".projector",
    "matrix_shape": ".projector",
    "projected_shapes": ".projector",
    "GaLoreRow": ".summary",
    "GaLoreSummary": ".summary",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
