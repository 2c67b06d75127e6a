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
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

__all__ = ["DEPTH", "forward_below", "foreign_forward", "has_forward", "remove_forward",
           "set_forward"]

DEPTH = {"lean": 0, "checkpoint": 0, "sparse": 1}
"""Where each owner's layer sits: lower is closer to the module's own computation."""

_LAYERS = "_convpeft_forwards"  # in m.__dict__: [(owner, bound forward)], innermost first
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
    previous layer of the same owner), placed by :data:`DEPTH`."""
    if owner not in DEPTH:
        raise ValueError(f"unknown forward owner {owner!r}; one of {', '.join(DEPTH)}")
    layers = _layers(m)
    top = layers[-1][1] if layers else None
    if not layers and "forward" in m.__dict__:  # someone else's instance forward: the base
        layers = [(_BASE, m.__dict__["forward"])]
        top = layers[0][1]
    layers = [(o, f) for o, f in layers if o != owner]
    layers.append((owner, types.MethodType(fn, m)))
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
    return below if below is not None else types.MethodType(type(m).forward, m)
