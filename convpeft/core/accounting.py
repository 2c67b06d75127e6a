"""Tensor accounting: which storage a tensor lives in, what an optimizer holds, meta copies.

The profiler's memory tracker, GaLore's state report and the lean probe all count bytes per
*storage* (two views of one buffer are one allocation) and run models on the ``meta`` device;
these are the few primitives they share. Nothing here imports the rest of convpeft.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = ["meta_copy", "state_bytes", "state_tensors", "storage_key", "untyped_storage_key"]


def untyped_storage_key(storage: torch.UntypedStorage) -> int:
    """Identity of an untyped storage, valid while it lives."""
    # the C++ StorageImpl address: the one place the project reads this private attribute
    return storage._cdata


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage, valid while it lives (also for meta/fake tensors)."""
    return untyped_storage_key(t.untyped_storage())


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor held in ``optimizer.state`` (nested lists/dicts included)."""
    leaves = tree_flatten([dict(s) for s in optimizer.state.values()])[0]
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every storage held in ``optimizer.state``, each storage counted once, whole."""
    sizes = {storage_key(t): t.untyped_storage().nbytes() for t in state_tensors(optimizer)}
    return sum(sizes.values())


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
