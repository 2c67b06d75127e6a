"""Choosing a method's learning rate on a validation split: :func:`select_lr`.

Every method has a default rate (:mod:`convpeft.methods`), picked for no task in particular.
A comparison of methods at their defaults measures whose default suits the task, and with a
short schedule, which method learns fastest, not which adapts best. :func:`select_lr`
fine-tunes with each rate of a small grid and keeps the one with the best accuracy on
``task.target_val`` (images of the target's training split that the training sample did not
take: :func:`convpeft.data.build_task`'s ``val_per_class``), never on the test split, so the
test accuracy of the chosen run is still an unbiased estimate. Ties go to the smaller rate: of
two equally good rates the smaller one moves the weights least.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data import Task
from ..methods import MethodConfig
from .finetuning import FinetuneResult, finetune

__all__ = ["LrSearch", "select_lr"]


@dataclass
class LrSearch:
    """What :func:`select_lr` tried and chose. ``val_acc``: rate -> validation accuracy;
    ``results``: rate -> that run's :class:`FinetuneResult` (without its model)."""

    lr: float
    val_acc: dict[float, float]
    results: dict[float, FinetuneResult] = field(repr=False)

    @property
    def chosen(self) -> FinetuneResult:
        """The run with the chosen rate (its test accuracy is the one to report)."""
        return self.results[self.lr]

    def grid_text(self) -> str:
        """``"3e-03:0.910 9e-03:0.950*"``: each rate's validation accuracy, the chosen one
        starred (the ``lr_grid_val`` column of a sweep row)."""
        return " ".join(f"{lr:.0e}:{acc:.3f}{'*' if lr == self.lr else ''}"
                        for lr, acc in sorted(self.val_acc.items()))


def select_lr(model: nn.Module, method: str | MethodConfig, task: Task, *,
              lrs: list[float], **finetune_kwargs: Any) -> LrSearch:
    """Fine-tune a copy of ``model`` with each rate in ``lrs`` and choose by validation
    accuracy. ``finetune_kwargs`` go to :func:`~convpeft.train.finetune` (epochs, batch size,
    seed, schedule, ...), the same for every rate; the caller's model is never changed.

    Raises ValueError when ``task`` has no validation split or ``lrs`` is empty.
    """
    if task.target_val is None or not len(task.target_val):
        raise ValueError("select_lr needs task.target_val; build the task with few_shot and "
                         "val_per_class (convpeft.data.build_task)")
    rates = sorted({float(lr) for lr in lrs})
    if not rates or any(lr <= 0 for lr in rates):
        raise ValueError(f"lrs must be positive rates, got {lrs}")
    finetune_kwargs = {**finetune_kwargs, "copy_model": True, "keep_model": False}
    results: dict[float, FinetuneResult] = {}
    for lr in rates:
        results[lr] = finetune(model, method, task, lr=lr, **finetune_kwargs)
    val = {lr: float(r.val_acc) for lr, r in results.items()}  # type: ignore[arg-type]
    best = max(rates, key=lambda lr: (val[lr], -lr))
    return LrSearch(best, val, results)
