"""Top-1 accuracy of a model on a dataset, without disturbing the model.

:func:`evaluate` runs in eval mode (BatchNorm's running statistics, no dropout) under
``no_grad`` and in fp32 whatever the training used, then restores the mode the model was in, so
a training loop can evaluate between epochs and carry on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import ImageDataset


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode; the previous mode is restored)."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in dataset.batches(batch_size, device=device):
        correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / len(dataset)
