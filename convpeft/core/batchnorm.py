"""BatchNorm utilities every layer above may use: which modules are BNs, running a no-grad
pass with the modes an evaluation sees (:func:`bn_pass`), and putting BN buffers back
(:class:`snapshot_bn`), and the input batches such a pass reads (:func:`input_batches`).

LoRA-FA's data-set ``A`` (:mod:`convpeft.adapters.lora_fa`) and precise BN
(:mod:`convpeft.train.batchnorm`) both read BN-normalised inputs in a no-grad pass and must leave
the model's modes, statistics and the caller's RNG as they were; the one way to do that lives
here, below both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["BN", "bn_pass", "input_batches", "snapshot_bn"]

BN = nn.modules.batchnorm._BatchNorm
"""Every BatchNorm class (1-d, 2-d, 3-d, SyncBatchNorm, lazy ones) derives from it."""


def input_batches(data: Iterable, batch_size: int, device: torch.device | str,
                  who: str) -> Iterator[torch.Tensor]:
    """The input batches ``(N, C, H, W)`` of ``data``, on ``device``: an
    :class:`~convpeft.data.ImageDataset` in batches of ``batch_size``, or an iterable of input
    tensors or of ``(input, target, ...)`` tuples (a ``DataLoader``), as they come. ``who`` names
    the calling function in the errors."""
    # checked now, not at the first batch: the caller has touched nothing yet
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{who}: batch_size must be an int >= 1 (got {batch_size!r})")
    if hasattr(data, "batches"):
        return (x for x, _ in data.batches(batch_size, device=device))
    if not isinstance(data, Iterable):
        raise TypeError(f"{who}: data must be an ImageDataset or an iterable of input batches "
                        f"(a DataLoader), got {type(data).__name__}")

    def each() -> Iterator[torch.Tensor]:
        for b in data:
            x = b[0] if isinstance(b, (tuple, list)) and b else b
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{who}: data yielded {type(x).__name__}, expected input "
                                "tensors or (input, target) tuples")
            yield x.to(device)

    return each()


@contextlib.contextmanager
def bn_pass(model: nn.Module, train_mode: Callable[[], Any] | None,
            device: torch.device | str) -> Iterator[nn.Module]:
    """Modes for a no-grad pass that reads BN-normalised inputs: ``train_mode()`` (default
    ``model.train()``) decides the BNs' modes, every other module runs in eval mode (no
    dropout, no drop-path: the inputs the layers see when the model is evaluated), and the
    caller's RNG is forked, so a run that makes such passes trains the same. Every module's
    mode is put back on exit. BN statistics are the caller's to guard (:class:`snapshot_bn`)."""
    modes = {m: m.training for m in model.modules()}
    device = torch.device(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            (train_mode or model.train)()
            for m in model.modules():
                if not isinstance(m, BN):
                    m.training = False
            yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


class snapshot_bn:
    """``with snapshot_bn(model): ...`` puts every BN's buffers back as they were on exit, so a
    loop can recalibrate, evaluate mid-run and carry on with the statistics it had;
    ``restore="on_error"``: only when the block raises (a failed call leaves them as they were).
    """

    def __init__(self, model: nn.Module, *, restore: str = "always"):
        if restore not in ("always", "on_error"):
            raise ValueError(f"restore must be 'always' or 'on_error' (got {restore!r})")
        self.model = model
        self.restore = restore

    def __enter__(self) -> nn.Module:
        self._saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)})
                       for m in self.model.modules() if isinstance(m, BN)]
        return self.model

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self.restore == "on_error" and exc_type is None:
            return
        with torch.no_grad():
            for m, bufs in self._saved:
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)
