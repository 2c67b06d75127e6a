"""Analytic mode's meta copies: FLOPs and predicted peak memory of one update from shapes alone.

:func:`~convpeft.profiler.analytic_profile` (in :mod:`.profile`, beside ``profile_update``)
copies the model and optimizer onto the ``meta`` device with :func:`meta_setup` (parameters,
buffers and optimizer state become data-less tensors of the same shape and dtype; nothing is
copied or computed), and the very same instrumented update (:mod:`.engine`) runs on them:
every aten op still dispatches with its real shapes, so FLOPs come out exactly as measured, and
the storage tracker sees the same allocations and frees, so the predicted peak matches the
measured one. It answers
"does MobileNetV2 + LoRA r=8 at batch 64, 224x224 fit in 512 MB?" in about the time of one
instrumented step on a tiny batch, with no memory for activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from convpeft.core.accounting import meta_copy as meta_copy  # re-exported

OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer]


def meta_setup(model: nn.Module, optimizer: OptimizerArg, input_shape: Sequence[int],
               targets: torch.Tensor | None = None
               ) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """Meta copies of ``model`` and its optimizer plus a meta batch of ``input_shape``
    ``(N, C, H, W)`` and targets ``(N,)`` class indices (or ``targets``' shape and dtype).

    ``optimizer`` is an optimizer over ``model``'s parameters (copied with the model, state
    included) or a factory ``model -> optimizer`` called on the meta copy."""
    shape = tuple(int(s) for s in input_shape)
    if isinstance(optimizer, torch.optim.Optimizer):
        mmodel, mopt = meta_copy(model, optimizer)
    elif callable(optimizer):
        mmodel = meta_copy(model)
        mopt = optimizer(mmodel)
    else:
        raise TypeError("optimizer must be a torch.optim.Optimizer or a callable model -> opt")
    for m in mmodel.modules():
        # momentum=None (a cumulative average, e.g. AdaBN) makes BN compute its factor in Python
        # from num_batches_tracked, which a meta tensor cannot give. The factor only changes the
        # value passed to the same batch-norm kernel, not its FLOPs or memory: any float does.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
            m.momentum = 0.1
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.empty(shape, dtype=dtype, device="meta")
    if targets is not None:
        y = torch.empty(targets.shape, dtype=targets.dtype, device="meta")
    else:
        y = torch.empty(shape[:1], dtype=torch.long, device="meta")
    return mmodel, mopt, x, y
