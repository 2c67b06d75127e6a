"""The training loop shared by pretraining and fine-tuning: one epoch of steps.

:func:`_train_epoch` shuffles with the caller's seeded generator (so a run repeats for a seed),
augments by random translation where asked, runs forward and loss under autocast when mixed
precision is on (:mod:`convpeft.core.amp`; fp16 scales the loss with a ``GradScaler``), and steps
the optimizer and an optional per-step scheduler. A last batch smaller than half a batch is dropped:
BatchNorm statistics of 1-3 images are noise. Module modes are the caller's
(``train_mode``), since a method may keep some BatchNorms frozen.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convpeft.core.amp import autocast

from ..data import ImageDataset


def default_device() -> torch.device:
    """CUDA when available, else the CPU (where training runs unless told otherwise)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` (zero fill): (N, C, H, W) -> same."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4)
    off = torch.randint(0, 2 * pixels + 1, (n, 2), generator=g).tolist()
    return torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(off)])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageDataset,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    scheduler: Any = None,
    augment_shift: int = 0,
    train_mode: Any = None,
    bar: Any = None,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    max_steps: int | None = None,
) -> tuple[float, float]:
    """One epoch; returns (mean loss, train accuracy). ``train_mode()`` sets module modes.
    ``amp``: forward and loss under autocast; ``scaler``: fp16 loss scaling (skips a step whose
    gradients overflowed and lowers the scale). ``max_steps``: stop after that many steps (a
    run counted in steps ends inside its last epoch)."""
    (train_mode or model.train)()
    # drop a last batch smaller than half a batch: BN statistics of 1-3 images are noise
    drop_last = len(data) % batch_size < batch_size // 2 and len(data) >= batch_size
    total_loss, correct, seen = 0.0, 0, 0
    for step, (x, y) in enumerate(data.batches(batch_size, shuffle=True, generator=generator,
                                               device=device, drop_last=drop_last)):
        if max_steps is not None and step >= max_steps:
            break
        if augment_shift:
            x = _random_shift(x, augment_shift, generator)
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_v = float(loss.detach())
        total_loss += loss_v * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _batches_per_epoch(n: int, batch_size: int) -> int:
    drop_last = n % batch_size < batch_size // 2 and n >= batch_size
    return n // batch_size if drop_last else math.ceil(n / batch_size)
