"""Will it fit? The largest batch whose training update fits a memory budget, per configuration.

:func:`plan` takes a model, an input resolution and a memory budget, and for every
configuration (method, rank, lean or not) finds the largest batch size whose update's peak
memory stays within the budget. Every figure comes from
:func:`convpeft.profiler.analytic_profile`: the update runs on meta tensors, so one evaluation
costs about one instrumented step of bookkeeping whatever the batch, needs no data, and works
for any model size. On CPU it predicts exactly what :func:`convpeft.profiler.profile_update`
measures (the tensor-level peak); on a GPU add what the tensor level cannot see (CUDA context,
allocator caching and fragmentation, cuDNN workspaces) as headroom.

Configurations follow the rank sweep's defaults (:mod:`convpeft.methods`): adapters or
GaLore projection on every conv, classifier trainable, BN in train mode, AdamW. ``bn``,
``optimizer`` and ``lean`` change them for every configuration; ``lean="both"`` plans each
configuration plain and with :func:`convpeft.lean_activations`. Models are built on the meta
device, so nothing is allocated for weights either.

One concept per module, all re-exported here:

* :mod:`~convpeft.planner.budget`: budget strings and their units (:func:`parse_budget`);
* :mod:`~convpeft.planner.search`: the exact batch search (:func:`largest_fitting`);
* :mod:`~convpeft.planner.config`: configurations and the models built for them;
* :mod:`~convpeft.planner.planning`: :func:`plan` and its :class:`PlanRow`;
* :mod:`~convpeft.planner.render`: the table and the figure.

The command line is :mod:`convpeft.plan` (``python -m convpeft.plan``).
"""

from .budget import format_bytes, parse_budget
from .config import (
    DEFAULT_RANKS,
    OPTIMIZERS,
    PlanConfig,
    build_configured,
    expand_configs,
)
from .config import LEAN_CHOICES as LEAN_CHOICES  # the CLI's --lean choices, not API
from .planning import DEFAULT_MAX_BATCH, PlanRow, plan
from .render import format_plan, plot_plan
from .search import largest_fitting

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_RANKS",
    "OPTIMIZERS",
    "PlanConfig",
    "PlanRow",
    "build_configured",
    "expand_configs",
    "format_bytes",
    "format_plan",
    "largest_fitting",
    "parse_budget",
    "plan",
    "plot_plan",
]
