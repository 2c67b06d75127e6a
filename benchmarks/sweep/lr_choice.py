"""The sweep's learning rates: each method's rate chosen once on a validation split.

With ``--lr-grid M1,M2,..`` (the presets' default: 0.3,1,3,10) every (model, task, method,
update_blocks) of the grid gets its rate from :func:`convpeft.train.select_lr`: the method's
default rate times each multiplier, fine-tuned on the *tuning seed* (the grid's first seed) at
the *tuning rank* (the middle of the grid's ranks, for ranked methods), chosen by accuracy on
the task's validation split (``--val-per-class`` images per class that the few-shot sample left
out; never test images). Every seed and rank of that method then trains with the chosen rate,
and the row of the tuning run itself is the chosen run (its test accuracy was never looked
at while choosing), so tuning costs ``len(grid) - 1`` extra fine-tunings per method, not a
second pass. A resumed sweep takes the chosen rates from its rows (``lr``, ``lr_source``).
``--lr`` turns tuning off: every method then runs at that rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from benchmarks.sweep.grid import Config, SweepSettings, method_config

__all__ = ["LrChoice", "choose_lr", "lr_key", "tuning_config"]


@dataclass
class LrChoice:
    """The chosen rate of one method: ``grid_text`` each tried rate's validation accuracy
    (``lr_grid_val`` column); ``tuned`` the configuration it was tuned on; ``result`` the
    chosen run's FinetuneResult (None when taken from the rows of an earlier run)."""

    lr: float
    grid_text: str
    tuned: Config
    result: Any = None


def lr_key(cfg: Config, s: SweepSettings) -> tuple:
    """What a tuned rate is shared by: every seed and rank of (model, task, method, K)."""
    return (cfg.model, s.dataset_for(cfg.task), cfg.task, cfg.method, cfg.update_blocks)


def tuning_config(cfg: Config, s: SweepSettings) -> Config:
    """The configuration ``cfg``'s rate is tuned on: the tuning seed, the tuning rank."""
    rank = None if cfg.rank is None else (s.lr_tune_rank or cfg.rank)
    return dataclasses.replace(cfg, seed=s.lr_tune_seed, rank=rank)


def choose_lr(cfg: Config, s: SweepSettings, source, task, zero_shot) -> LrChoice:
    """Run the search for ``cfg``'s method (``source``/``task`` those of
    :func:`tuning_config`'s seed; ``zero_shot`` its accuracies, or None)."""
    import torch

    from convpeft.train import select_lr

    tuned = tuning_config(cfg, s)
    mcfg = method_config(tuned, s)
    base = mcfg.resolved_lr
    torch.manual_seed(tuned.seed)  # as run_config seeds every fine-tuning
    search = select_lr(source, mcfg, task, lrs=[base * m for m in s.lr_grid],
                       epochs=s.epochs, steps=s.steps_for(cfg.task), batch_size=s.batch_size,
                       seed=tuned.seed, device=torch.device(s.device), progress=False,
                       eval_every_epoch=False, zero_shot=zero_shot, amp=s.amp,
                       precise_bn=s.precise_bn, schedule=s.schedule, warmup=s.warmup,
                       memory_format=s.memory_format)
    return LrChoice(search.lr, search.grid_text(), tuned, search.chosen)
