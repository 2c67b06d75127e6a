"""A replacement ``forward`` stored on one module instance, that pickles.

``lean_activations``, ``checkpoint_blocks`` and ``sparse_update`` swap a module's ``forward``
by setting the instance attribute ``forward``. A bound method (``types.MethodType(fn, m)``)
pickles as ``getattr(m, fn.__name__)``, which fails on unpickling (the module has no attribute
of that name): ``torch.save(model)``, ``pickle`` and multiprocessing could write such a model
but not read it back. :class:`InstanceForward` is called like that bound method, and pickles
(and deep-copies) as the module-level function ``fn`` plus the module, so the copy runs the
same replacement forward on the copied module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class InstanceForward:
    """``InstanceForward(fn, m)(*args)`` is ``fn(m, *args)``; ``fn`` must be a module-level
    function (it is pickled by reference). ``__func__``/``__self__`` as on a bound method."""

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self.__func__ = fn
        self.__self__ = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple:
        # the module is already memoised when its __dict__ (holding this object) is pickled,
        # so the reference cycle module -> forward -> module round-trips
        return (InstanceForward, (self.__func__, self.__self__))

    def __repr__(self) -> str:
        return f"<forward {self.__func__.__name__} of {type(self.__self__).__name__}>"


def swap_forward(module: nn.Module, fn: Callable[..., Any]) -> None:
    """Set ``module.forward`` to ``fn(module, ...)`` on this instance (picklable); deleting the
    instance attribute ``forward`` restores the class's forward."""
    module.forward = InstanceForward(fn, module)
