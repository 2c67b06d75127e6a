"""Instance forwards that several techniques swap on one module, composed in a fixed order.

:func:`convpeft.lean_activations` (bare layers), :func:`convpeft.checkpoint_blocks` (blocks)
and :func:`convpeft.sparse_update` (the frozen prefix: bare layers *and* blocks) each replace a
module's ``forward`` on the instance, so one module can carry two of them (a lean stem conv in
a sparse update's prefix). Each technique owns one *layer* of a small per-module stack kept in
the module's ``__dict__``; the stack is ordered by a fixed depth (:data:`DEPTH`: lean and
checkpointing inside, the sparse prefix outside), whatever order the calls came in, and the
instance ``forward`` is always the outermost layer's. A layer calls the one below it through
:func:`forward_below` at run time, not through a reference captured when it was installed, so
removing a layer (an ``undo()``, in any order) re-links the rest, and nothing is left pointing
at a forward that is gone. A ``forward`` set on the instance by something else before the
first layer is kept as the stack's base and comes back when the last layer goes.

Each layer is an :class:`InstanceForward`, not a bound method: a bound method
(``types.MethodType(fn, m)``) pickles as ``getattr(m, fn.__name__)``, which fails on
unpickling (the module has no attribute of that name), so ``torch.save(model)``, ``pickle`` and
multiprocessing could write such a model but not read it back. An :class:`InstanceForward`
pickles and deep-copies as the module-level function plus the module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["DEPTH", "InstanceForward", "forward_below", "foreign_forward", "has_forward",
           "remove_forward", "set_forward", "undo_marked"]

DEPTH = {"lean": 0, "checkpoint": 0, "sparse": 1}
"""Where each owner's layer sits: lower is closer to the module's own computation."""


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


_LAYERS = "_convpeft_forwards"  # in m.__dict__: [(owner, InstanceForward)], innermost first
_BASE = ""  # owner of a forward that was on the instance before our first layer


def _depth(owner: str) -> int:
    return -1 if owner == _BASE else DEPTH[owner]


def _layers(m: nn.Module) -> list[tuple[str, Callable]]:
    return list(m.__dict__.get(_LAYERS, ()))


def _install(m: nn.Module, layers: list[tuple[str, Callable]], top: Callable | None) -> None:
    """Store ``layers`` and point the instance forward at the outermost one. ``top`` is the
    forward the stack last installed: if something else has replaced it since, that
    replacement is left in place (it is not ours to undo)."""
    current = m.__dict__.get("forward")
    ours = current is None or current is top
    only_base = len(layers) == 1 and layers[0][0] == _BASE
    if not layers or only_base:
        m.__dict__.pop(_LAYERS, None)
        if ours and only_base:  # the instance forward it was
            m.__dict__["forward"] = layers[0][1]
        elif ours:
            m.__dict__.pop("forward", None)
        return
    m.__dict__[_LAYERS] = layers
    if ours:
        m.__dict__["forward"] = layers[-1][1]


def set_forward(m: nn.Module, owner: str, fn: Callable[..., object]) -> None:
    """Make ``fn(m, *args, **kwargs)`` ``owner``'s layer of ``m``'s forward (replacing a
    previous layer of the same owner), placed by :data:`DEPTH`. ``fn`` must be a module-level
    function (it is pickled by reference, see :class:`InstanceForward`)."""
    if owner not in DEPTH:
        raise ValueError(f"unknown forward owner {owner!r}; one of {', '.join(DEPTH)}")
    layers = _layers(m)
    top = layers[-1][1] if layers else None
    if not layers and "forward" in m.__dict__:  # someone else's instance forward: the base
        layers = [(_BASE, m.__dict__["forward"])]
        top = layers[0][1]
    layers = [(o, f) for o, f in layers if o != owner]
    layers.append((owner, InstanceForward(fn, m)))
    layers.sort(key=lambda layer: _depth(layer[0]))  # stable: same depth keeps call order
    _install(m, layers, top)


def remove_forward(m: nn.Module, owner: str) -> bool:
    """Take ``owner``'s layer off ``m``'s forward (wherever it sits); False if it had none."""
    layers = _layers(m)
    if not any(o == owner for o, _ in layers):
        return False
    top = layers[-1][1]
    _install(m, [(o, f) for o, f in layers if o != owner], top)
    return True


def has_forward(m: nn.Module, owner: str) -> bool:
    """Does ``m`` carry a layer of ``owner``?"""
    return any(o == owner for o, _ in _layers(m))


def foreign_forward(m: nn.Module) -> bool:
    """Is ``m``'s instance forward something none of the owners set (a user's own swap)?"""
    layers = _layers(m)
    if not layers:
        return "forward" in m.__dict__
    return layers[0][0] == _BASE or m.__dict__.get("forward") is not layers[-1][1]


def forward_below(m: nn.Module, owner: str) -> Callable[..., object]:
    """The forward under ``owner``'s layer of ``m``: the next layer in, the base instance
    forward, or the class's own ``forward`` bound to ``m``."""
    below = None
    for o, f in _layers(m):
        if o == owner:
            break
        below = f
    if below is not None:
        return below
    # the class's forward on m; a partial rather than types.MethodType, which torch.compile
    # cannot build while tracing (a graph break at every wrapped module)
    return functools.partial(type(m).forward, m)


def undo_marked(model: nn.Module, mark: str, undo: Callable[[nn.Module], None]) -> int:
    """``undo(m)`` on every module of ``model`` that carries the instance attribute ``mark``
    (the technique's tag); returns how many: what ``restore_activations``,
    ``restore_checkpointing`` and ``restore_sparse`` each do with their own tag."""
    marked = [m for m in model.modules() if mark in m.__dict__]
    for m in marked:
        undo(m)
    return len(marked)

