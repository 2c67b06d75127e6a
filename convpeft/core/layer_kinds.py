"""What kind of layer a module is, and which layers a ``target`` selects.

Edge CNNs mix four kinds of convolution, and each needs its own adapter shape and FLOP formula:

==============  ==========================================================
kind            definition
==============  ==========================================================
``pointwise``   ``Conv2d`` with a 1x1 kernel and ``groups == 1``
``standard``    ``Conv2d`` with ``groups == 1`` and a larger kernel
``depthwise``   ``Conv2d`` with ``groups == in_channels > 1`` (any channel multiplier)
``grouped``     ``Conv2d`` with ``1 < groups < in_channels`` (ResNeXt style)
``linear``      ``nn.Linear``
==============  ==========================================================

An ``nn.Conv2d`` subclass (timm's ``Conv2dSame``, ``StdConv2d``...) has the kind of its
geometry; whether an adapter can reproduce its ``forward`` is decided by
:mod:`convpeft.core.conv_variants` (unregistered ones are refused by ``apply_adapters``).

Targets accepted by :func:`select_layers` (and by ``apply_adapters``/``galore_optimizer``):
a kind above, ``"conv"`` (every Conv2d), ``"standard"`` (every ``groups == 1`` conv, so pointwise
too), ``"all"`` (every conv and linear), a list of these, or a callable ``(name, module) -> bool``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

LAYER_KINDS = ("pointwise", "standard", "depthwise", "grouped", "linear")
TARGETS = ("conv", "standard", "pointwise", "depthwise", "grouped", "linear", "all")

Target = str | Sequence[str] | Callable[[str, nn.Module], bool]


def layer_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` (see the module docstring), or ``None`` if it is not conv/linear."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        g, cin = module.groups, module.in_channels
        if g == 1:
            return "pointwise" if tuple(module.kernel_size) == (1, 1) else "standard"
        if g == cin:
            return "depthwise"
        return "grouped"
    return None


def _kind_matches(kind: str, target: str) -> bool:
    if target == "all":
        return True
    if target == "conv":
        return kind != "linear"
    if target == "standard":
        return kind in ("standard", "pointwise")
    return kind == target


def check_target(target: Target) -> None:
    """Raise a ``ValueError`` naming the accepted targets if ``target`` is not one of them."""
    if callable(target):
        return
    names = [target] if isinstance(target, str) else list(target)
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ValueError(
            f"unknown target {bad or names!r}; use one of {', '.join(TARGETS)}, a list of them, "
            "or a callable (name, module) -> bool"
        )


def target_matches(name: str, module: nn.Module, target: Target) -> bool:
    """Whether ``target`` selects the layer ``module`` called ``name``."""
    if callable(target):
        return bool(target(name, module))
    kind = layer_kind(module)
    if kind is None:
        return False
    names = [target] if isinstance(target, str) else list(target)
    return any(_kind_matches(kind, t) for t in names)


def pattern_list(patterns: str | Iterable[str] | None, *, what: str = "patterns") -> list[str]:
    """``patterns`` as a list of valid regexes. A single string is ONE pattern: iterating it
    would give one-letter regexes that match almost every name (``trainable="fc"`` would then
    unfreeze every parameter with an ``f`` or ``c`` in its name)."""
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in items:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a regex string or a list of them; got item {p!r}")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"bad regex {p!r} in {what}: {e}") from None
    return items


def select_layers(
    model: nn.Module,
    target: Target = "conv",
    exclude: Iterable[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every conv/linear layer of ``model`` selected by ``target``.

    ``exclude`` is a regex or a list of regexes; a layer whose qualified name matches any of
    them (``re.search``) is left out.
    """
    check_target(target)
    patterns = [re.compile(p) for p in pattern_list(exclude, what="exclude")]
    out = []
    for name, module in model.named_modules():
        if layer_kind(module) is None and not callable(target):
            continue
        if not target_matches(name, module, target):
            continue
        if any(p.search(name) for p in patterns):
            continue
        out.append((name, module))
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (e.g. ``"layer1.0.conv1"``) by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
