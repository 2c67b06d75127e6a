"""Analytic mode: FLOPs and predicted peak memory of one update from shapes alone.

The model and optimizer are copied onto the ``meta`` device (parameters, buffers and optimizer
state become data-less tensors of the same shape and dtype; nothing is copied or computed), and
the very same instrumented update of :func:`profile_update` runs on them: every aten op still
dispatches with its real shapes, so FLOPs come out exactly as measured, and the storage tracker
sees the same allocations and frees, so the predicted peak matches the measured one. It answers
"does MobileNetV2 + LoRA r=8 at batch 64, 224x224 fit in 512 MB?" in about the time of one
instrumented step on a tiny batch, with no memory for activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from convpeft.profiler.memory import state_tensors
from convpeft.profiler.profile import (
    LossFn,
    UpdateProfile,
    _build,
    _check_inputs,
    _instrumented,
    _warm_up,
)

OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer]


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def meta_copy(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Deep copy of ``model`` (and ``optimizer``, keeping their links) whose parameters,
    buffers, gradients and optimizer state live on the meta device. No tensor data is copied:
    the memo maps every tensor to a fresh meta tensor before ``deepcopy`` reaches it."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        mp = nn.Parameter(_to_meta(p), requires_grad=p.requires_grad)
        if p.grad is not None:
            mp.grad = _to_meta(p.grad)
        memo[id(p)] = mp
    for b in model.buffers():
        memo[id(b)] = _to_meta(b)
    if optimizer is not None:
        for t in state_tensors(optimizer):
            # 0-dim CPU step counters stay real: optimizers read them with .item()
            if t.dim() > 0 or t.device.type != "cpu":
                memo[id(t)] = _to_meta(t)
        return copy.deepcopy((model, optimizer), memo)
    return copy.deepcopy(model, memo)


def analytic_profile(
    model: nn.Module,
    optimizer: OptimizerArg,
    input_shape: Sequence[int],
    *,
    targets: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    warmup: int = 1,
    per_layer: bool = False,
    compare_torch: bool = True,
) -> UpdateProfile:
    """Predict :func:`profile_update`'s FLOPs and memory for a batch of ``input_shape``
    ``(N, C, H, W)`` without real data or compute; ``model``/``optimizer`` are left untouched.

    ``optimizer`` is either an optimizer over ``model``'s parameters (it is copied with the model,
    state included) or a factory ``model -> optimizer`` called on the meta copy. Targets are
    class indices of shape ``(N,)`` unless ``targets`` is given (only its shape and dtype are
    used). Step times are None.
    """
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
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    _check_inputs(mmodel, mopt, x, y)
    galore = _warm_up(mmodel, mopt, x, y, loss_fn, warmup)
    tally, mem, t_instr, flops_torch, _ = _instrumented(
        mmodel, mopt, x, y, loss_fn, per_layer, compare_torch)
    prof = _build(mmodel, mopt, x, tally, mem, t_instr, flops_torch, None, [], [], galore,
                  analytic=True)
    prof.device = "meta (analytic)"
    return prof
