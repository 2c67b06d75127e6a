"""A failed call leaves the caller's model exactly as it was: :func:`model_transaction`.

Every public call that changes a model in place (:func:`convpeft.prepare`,
:func:`convpeft.apply_adapters` through it, :func:`convpeft.sparse_update`,
:func:`convpeft.lean_activations`, :func:`convpeft.checkpoint_blocks`,
:func:`convpeft.train.recalibrate_bn` / ``adapt_prefix_bn``,
:func:`convpeft.adapters.calibrate_frozen_a`) runs its changes inside one
``with model_transaction(model):`` block. The calls still check what they can up front, so that
most bad input is refused before anything is touched; the transaction covers what only shows
once the work is under way (a setup step that refuses late, an interrupt, a failing forward),
so there is one undo for every call instead of a hand-written one per function.

What it puts back when the block raises (any exception, ``KeyboardInterrupt`` included), for
every module reachable from the model at entry:

* the module's own attributes (its ``__dict__``): instance ``forward`` swaps and their marks,
  ``training`` modes, BN ``momentum``, and the contents of its child, parameter, buffer and hook
  tables (so a child replaced by an adapter wrapper is the original child again, and a hook
  registered in the block is gone; the tables stay the same objects, so handles made before
  the block still work);
* every parameter's ``requires_grad`` flag;
* every buffer's values (BN running statistics and counts: small), copied back in place.

Not covered: parameter *values* (copying every weight would double the model's memory; none of
these calls writes a weight before its last step), optimizer objects the block created (they
are simply dropped with the exception), and state outside the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["model_transaction"]


class _ModuleState:
    """One module's attributes, table contents, parameter flags and buffer values."""

    def __init__(self, m: nn.Module) -> None:
        self.module = m
        # (key, value, a copy of its items if it is a table) for every attribute
        self.attrs = [(k, v, dict(v) if isinstance(v, dict) else None)
                      for k, v in m.__dict__.items()]
        self.flags = [(p, p.requires_grad) for p in m._parameters.values() if p is not None]
        self.buffers = [(b, b.detach().clone()) for b in m._buffers.values()
                        if b is not None and b.device.type != "meta"]

    def restore(self) -> None:
        d = self.module.__dict__
        keep = {k for k, _, _ in self.attrs}
        for k in [k for k in d if k not in keep]:
            del d[k]
        for k, v, items in self.attrs:
            if items is not None:  # the same table object, its old contents
                v.clear()
                v.update(items)
            d[k] = v
        for p, flag in self.flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)


@contextlib.contextmanager
def model_transaction(model: nn.Module) -> Iterator[nn.Module]:
    """``with model_transaction(model): ...``: if the block raises, ``model`` is put back as it
    was at entry (see the module docstring) and the exception propagates."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    saved = [_ModuleState(m) for m in model.modules()]
    try:
        yield model
    except BaseException:
        for s in saved:
            s.restore()
        raise
