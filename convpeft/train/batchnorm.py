"""Precise BatchNorm statistics: the running averages replaced by those of the final weights.

A BN layer in train mode normalises with the batch's statistics but evaluates with running
averages (momentum 0.1) collected while the weights were still moving. After a long run the
lag does not matter; after a short fine-tuning run (the sweep's ~15 steps) the running
averages are still a blend of the source model's statistics and those of weights that no
longer exist, and a model that trained well can evaluate badly: in the default sweep, ResNet18
LoRA r=16 on new classes, seed 8, evaluated at 27% with the running averages and at 72% with
the exact statistics of its final weights (measured; docs/memory.md). The lag grows with how far
an update moves the weights, so it hit high ranks hardest and made them look unstable.

:func:`recalibrate_bn` replaces them by the exact average over one pass of data in train mode
under ``no_grad`` (what Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, call PreciseBN).
It costs one forward pass over the training set and no more memory than an update's forward.
:func:`adapt_prefix_bn` does the same for a sparse update's frozen prefix before training
(AdaBN: its statistics re-estimated on the target data, then frozen again).
Only BNs that actually run in train mode during the pass are touched: a BN that a
``train_mode`` callable leaves in eval mode (``bn="freeze"``), that a sparse update's frozen
prefix forces into eval mode, or that the forward never reaches keeps its statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from convpeft.memory.sparse import prefix_bn_follows_mode

from ..core.atomic import model_transaction
from ..core.batchnorm import BN as _BN
from ..core.batchnorm import bn_pass, input_batches
from ..core.batchnorm import snapshot_bn as snapshot_bn  # re-exported: convpeft.train's API
from ..data import ImageDataset

if TYPE_CHECKING:
    from convpeft.memory.sparse import SparseSplit

@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageDataset | Iterable, *, batch_size: int,
                   device: torch.device | str,
                   train_mode: Callable[[], Any] | None = None) -> int:
    """Replace the running statistics of the BNs that run in train mode by their exact average
    over ``data`` (one pass, no gradients, momentum ``None`` = cumulative average over the
    batches); returns how many BNs were recalibrated. ``data``: an
    :class:`~convpeft.data.ImageDataset` (in batches of ``batch_size``) or an iterable of input
    batches (tensors or ``(input, target)`` tuples, e.g. a ``DataLoader``).

    ``train_mode()`` sets the BNs' modes for the pass (default ``model.train()``; a fine-tuning
    run passes its method's, so ``bn="freeze"`` recalibrates nothing); every other module runs
    in eval mode (no dropout), as when the model is evaluated. A BN that saw no batch in train
    mode keeps the statistics it had. Modes, momenta and the global RNG are left as they were;
    if the pass fails, the statistics too.
    """
    batches = input_batches(data, batch_size, device, "recalibrate_bn")
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns or (hasattr(data, "__len__") and len(data) == 0):
        return 0
    momenta = {m: m.momentum for m in bns}
    counts = {m: m.num_batches_tracked.clone() for m in bns}
    try:
        # a failed pass puts back the statistics and the counts zeroed below (and everything
        # else about the model)
        with model_transaction(model), bn_pass(model, train_mode, device):
            # momentum None averages cumulatively with weight 1 / num_batches_tracked: from a
            # count of 0 the first batch that a BN normalises in train mode replaces its
            # statistics outright and the later ones average in. Nothing is reset up front, so
            # a BN that never normalises in train mode (forced into eval mode by a sparse
            # update's prefix, which its module call merely passes through; never reached)
            # keeps the statistics it normalises with.
            for m in bns:
                m.momentum = None
                m.num_batches_tracked.zero_()
            for x in batches:
                model(x)
    finally:
        for m in bns:
            m.momentum = momenta[m]
    done = 0
    for m in bns:
        if int(m.num_batches_tracked) == 0:  # never normalised in train mode: as it was
            m.num_batches_tracked.copy_(counts[m])
        else:
            done += 1
    return done


def adapt_prefix_bn(model: nn.Module, split: SparseSplit, data: ImageDataset, *,
                    batch_size: int, device: torch.device | str) -> int:
    """Re-estimate the running statistics of the BNs in ``split``'s frozen prefix (a sparse
    update's, :func:`convpeft.memory.sparse.sparse_split`) on ``data``, before the model is wrapped
    for the sparse update; every other BN keeps its statistics. This is AdaBN for the frozen part
    of the network: on a distribution shift the source model's statistics no longer fit the
    target inputs, and a prefix that runs in eval mode would otherwise never see the target's.
    Afterwards the prefix is a fixed function again (eval mode, frozen statistics), so chunking
    it stays exact. ``batch_size``: the micro-batch of the pass (a sparse update passes its
    batch over ``prefix_chunks``, so the pass needs no more memory than the update's chunked
    prefix). Returns how many BNs were re-estimated.

    Also after :func:`convpeft.methods.prepare` has wrapped the model for the sparse update
    (the order of a custom loop): the wrapping keeps the prefix's BNs in eval mode, and this
    pass lifts that for its duration, so they are re-estimated all the same. ``split`` must be
    one of ``model`` (``ValueError`` naming the missing module otherwise)."""
    modules = dict(model.named_modules())
    missing = [p for p in split.prefix if p not in modules]
    if missing:
        raise ValueError(f"adapt_prefix_bn: the split's prefix names {missing[0]!r}, which "
                         f"{type(model).__name__} does not have; pass the split of this "
                         "model (MethodConfig.split(model) or "
                         "convpeft.memory.sparse.sparse_split(model, K))")
    prefix_bns = [m for name, m in modules.items()
                  if isinstance(m, _BN) and split.in_prefix(name)]

    def prefix_train_mode() -> None:
        model.eval()
        for m in prefix_bns:
            m.train()

    with prefix_bn_follows_mode(model):
        return recalibrate_bn(model, data, batch_size=batch_size, device=device,
                              train_mode=prefix_train_mode)
