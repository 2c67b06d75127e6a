"""Learning-rate schedules for fine-tuning, as per-step multipliers of the method's rate.

``"constant"`` keeps the rate; ``"cosine"`` warms up linearly over the first ``warmup`` share
of the steps (at least one step) and then decays along a half cosine to zero at the last step
(Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts; the warm-up as in Goyal et al.,
"Accurate, Large Minibatch SGD", 2017). Why cosine for the sweep: a constant rate
that is large enough to move an adapter in a few dozen steps keeps the last steps noisy, so
the final weights depend on the last few batches; decaying to zero lets every method settle
and makes "twice the steps" a fair convergence check (``benchmarks.rank_sweep``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "lr_multiplier", "make_scheduler"]

SCHEDULES = ("constant", "cosine")


def lr_multiplier(step: int, total: int, schedule: str, warmup: float = 0.1) -> float:
    """Factor on the base rate for optimizer step ``step`` (0-based) of ``total`` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a share of the steps in [0, 1), got {warmup}")
    if schedule == "constant" or total <= 1:
        return 1.0
    n_warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < n_warm:
        return (step + 1) / (n_warm + 1)
    # the last step runs at a small positive rate: a zero-rate step would be wasted compute
    progress = (step - n_warm + 1) / (total - n_warm + 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, schedule: str,
                   warmup: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A ``LambdaLR`` stepping :func:`lr_multiplier` once per optimizer step (None: constant)."""
    lr_multiplier(0, max(total, 1), schedule, warmup)  # validate before touching the optimizer
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, schedule, warmup))
