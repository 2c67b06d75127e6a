"""Conv variants: ``nn.Conv2d`` subclasses whose ``forward`` computes more than ``nn.Conv2d``'s,
described so that adapters, merging and lean activations reproduce them exactly.

An adapter wrapper does not call its base layer's ``forward``: it runs the convolution itself
(``F.conv2d`` with the base weight, or with ``W0 + s dW``), so a subclass that pads its input
by the input size (timm's ``Conv2dSame``, TF-style "SAME") or transforms its weight before the
conv (timm's ``StdConv2d``/``ScaledStdConv2d``, weight standardisation) would be bypassed: a
crash at best, a silently different model at worst. Every conv this library touches therefore
computes, by definition,

    y = conv2d(pad_static(pad_input(x)), weight(m), bias, stride, dilation, groups)

with the three hooks of a :class:`ConvVariant`:

* ``weight(m)``: the effective weight ``(C_out, C_in/g, k_h, k_w)`` the forward convolves with,
  differentiable in ``m``'s parameters (``None``: ``m.weight`` as stored);
* ``input_pad(m, (H, W))``: zero padding ``[left, right, top, bottom]`` computed from the input
  size, applied before the conv (``None``: none); ``pad_static`` is then ``m.padding``;
* ``padding_mode``: whether the forward honours ``m.padding_mode`` (timm's convs pass only
  ``m.padding`` to ``F.conv2d``, i.e. always zeros);
* ``plain(m, weight)``: a module without the weight transform computing the same function with
  ``weight`` (what merging puts in place of a layer whose weight cannot absorb an update).

The variant of a module is looked up by the class that defines its ``forward`` (so a subclass
that inherits a registered forward inherits its variant): ``nn.Conv2d`` itself is
:data:`PLAIN`; timm's ``Conv2dSame``, ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d`` and
``ScaledStdConv2dSame`` are built in (matched by their dotted class name, so timm is never
imported here); anything else with its own ``forward`` or ``_conv_forward`` is refused by
:func:`conv_variant` with an error naming the class, until :func:`register_conv_variant`
describes it. The same holds for ``nn.Linear`` subclasses (no linear variants are built in).

Merging. An adapter adds ``s dW`` to the *effective* weight. Where ``weight`` is the stored
weight (plain convs, ``Conv2dSame``), ``W0 + s dW`` is written back into the layer, which keeps
its class. Weight standardisation is not linear: no stored ``W`` gives
``standardise(W) = standardise(W0) + s dW`` in general, so such a layer (``folds`` False) is
*replaced* on merge by ``plain(m, W_eff + s dW)`` -- an ``nn.Conv2d`` (or timm's ``Conv2dSame``
for dynamic "SAME" padding) holding the merged effective weight, exact and deployable. A conv
whose weight is a ``torch.nn.utils.parametrize`` parametrisation is treated the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize

__all__ = [
    "PLAIN", "ConvVariant", "UnsupportedLayerError", "check_supported_layer", "conv_variant",
    "register_conv_variant", "registered_conv_variant", "same_padding",
]


class UnsupportedLayerError(TypeError):
    """A conv/linear subclass whose ``forward`` convpeft cannot reproduce exactly."""


def plain_conv(m: nn.Conv2d, weight: torch.Tensor, *, padding_mode: bool = True) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``m``'s geometry and bias, holding ``weight`` (C_out, C_in/g, kh, kw)
    (detached); ``padding_mode=False`` gives zero padding whatever ``m.padding_mode`` says."""
    w = weight.detach()
    out = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                    m.dilation, m.groups, m.bias is not None,
                    m.padding_mode if padding_mode else "zeros", device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if m.bias is not None:
            out.bias.copy_(m.bias.detach())
    return out


@dataclass(frozen=True)
class ConvVariant:
    """How one kind of ``nn.Conv2d`` computes its output (see the module docstring)."""

    name: str
    weight: Callable[[nn.Conv2d], torch.Tensor] | None = None
    input_pad: Callable[[nn.Conv2d, tuple[int, int]], list[int] | None] | None = None
    padding_mode: bool = True
    plain: Callable[[nn.Conv2d, torch.Tensor], nn.Module] | None = None

    @property
    def folds(self) -> bool:
        """Can ``W_eff + s dW`` be written back into the stored weight (no weight transform)?"""
        return self.weight is None

    def effective_weight(self, m: nn.Conv2d) -> torch.Tensor:
        """The weight ``m``'s forward convolves with, ``(C_out, C_in/g, k_h, k_w)``."""
        return m.weight if self.weight is None else self.weight(m)

    def pad_input(self, m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) with the input-size-dependent zero padding applied (if any)."""
        pads = self.input_pads(m, tuple(x.shape[-2:]))
        return x if pads is None else F.pad(x, pads)

    def input_pads(self, m: nn.Conv2d, hw: tuple[int, int]) -> list[int] | None:
        """``[left, right, top, bottom]`` zero padding for an input of size ``hw``, or ``None``."""
        if self.input_pad is None:
            return None
        pads = self.input_pad(m, (int(hw[0]), int(hw[1])))
        return None if pads is None or not any(pads) else list(pads)

    def plain_layer(self, m: nn.Conv2d, weight: torch.Tensor) -> nn.Module:
        """A module without weight transform computing ``m``'s function with ``weight``."""
        if self.plain is not None:
            return self.plain(m, weight)
        if self.input_pad is not None:
            raise UnsupportedLayerError(
                f"conv variant {self.name!r} pads its input dynamically but gives no plain "
                "equivalent; pass plain=... to register_conv_variant")
        return plain_conv(m, weight, padding_mode=self.padding_mode)


PLAIN = ConvVariant("nn.Conv2d")
"""``nn.Conv2d`` itself (and subclasses that keep its ``forward``)."""


# --------------------------------------------------------------------------- TF "SAME" padding


def same_padding(hw: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> list[int]:
    """TensorFlow's "SAME" padding ``[left, right, top, bottom]`` for an input of size ``hw``:
    the output has ``ceil(size / stride)`` positions; the total padding is what that needs
    (never negative), the odd pixel going right/bottom."""
    pads = []
    for size, k, s, d in zip(hw, kernel_size, stride, dilation, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return [left, right, top, bottom]


def _tf_same(m: nn.Conv2d, hw: tuple[int, int]) -> list[int]:
    return same_padding(hw, _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation))


def _tf_same_if_dynamic(m: nn.Conv2d, hw: tuple[int, int]) -> list[int] | None:
    # timm decides at construction: static "SAME" becomes a numeric padding, dynamic sets this
    return _tf_same(m, hw) if getattr(m, "same_pad", False) else None


# --------------------------------------------------------------------- weight standardisation


def standardized_weight(weight: torch.Tensor, eps: float,
                        gain: torch.Tensor | None = None) -> torch.Tensor:
    """Weight standardisation (Qiao et al. 2019): every output row of ``weight``
    ``(C_out, ...)`` shifted to mean 0 and scaled to ``1 / sqrt(var + eps)`` (biased variance),
    then multiplied by ``gain`` (C_out,) if given. Differentiable; same shape as ``weight``.

    Computed as a training-mode batch norm over the ``(1, C_out, K)`` view, the kernel timm's
    forward uses, so the result is the same bit for bit (an explicit ``var_mean`` formula differs
    in the last bits, which fifty layers amplify to ~1e-5).
    """
    rows = weight.reshape(1, weight.shape[0], -1)
    out = F.batch_norm(rows, None, None, weight=gain, training=True, momentum=0.0, eps=eps)
    return out.reshape(weight.shape)


def _std_weight(m: nn.Conv2d) -> torch.Tensor:
    return standardized_weight(m.weight, float(m.eps))


def _scaled_std_weight(m: nn.Conv2d) -> torch.Tensor:
    # NF-Nets' scaled WS: gain (C_out, 1, 1, 1) times the fixed gamma / sqrt(fan_in) in m.scale
    return standardized_weight(m.weight, float(m.eps), m.gain.reshape(-1) * float(m.scale))


def _timm_conv2d_same(m: nn.Conv2d, weight: torch.Tensor) -> nn.Module:
    """timm's ``Conv2dSame`` (dynamic TF "SAME" padding) with ``m``'s geometry and bias, holding
    ``weight``. Only called for timm's own classes, so timm is importable then."""
    from timm.layers import Conv2dSame

    w = weight.detach()
    out = Conv2dSame(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation,
                     m.groups, m.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if m.bias is not None:
            out.bias.copy_(m.bias.detach())
    return out


def _plain_same(m: nn.Conv2d, weight: torch.Tensor) -> nn.Module:
    """``Conv2dSame`` for a dynamic "SAME" layer, else an ``nn.Conv2d`` (static padding)."""
    if getattr(m, "same_pad", False):
        return _timm_conv2d_same(m, weight)
    return plain_conv(m, weight, padding_mode=False)


_TIMM = "timm.layers."
_BUILTIN: dict[str, ConvVariant] = {
    _TIMM + "conv2d_same.Conv2dSame": ConvVariant(
        "timm Conv2dSame", input_pad=_tf_same, padding_mode=False, plain=_timm_conv2d_same),
    _TIMM + "std_conv.StdConv2d": ConvVariant(
        "timm StdConv2d", weight=_std_weight, padding_mode=False),
    _TIMM + "std_conv.StdConv2dSame": ConvVariant(
        "timm StdConv2dSame", weight=_std_weight, input_pad=_tf_same_if_dynamic,
        padding_mode=False, plain=_plain_same),
    _TIMM + "std_conv.ScaledStdConv2d": ConvVariant(
        "timm ScaledStdConv2d", weight=_scaled_std_weight, padding_mode=False),
    _TIMM + "std_conv.ScaledStdConv2dSame": ConvVariant(
        "timm ScaledStdConv2dSame", weight=_scaled_std_weight, input_pad=_tf_same_if_dynamic,
        padding_mode=False, plain=_plain_same),
}
_REGISTRY: dict[type, ConvVariant] = {}


def register_conv_variant(cls: type, variant: ConvVariant) -> None:
    """Describe how the ``nn.Conv2d`` subclass ``cls`` computes (see :class:`ConvVariant`), so
    that adapters and lean activations accept it. A class is registered once, as in the other
    registries (:mod:`convpeft.core.registry`): registering it again with another variant raises
    ``ValueError`` (the same variant again is a no-op)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Conv2d)):
        raise TypeError(f"register_conv_variant takes an nn.Conv2d subclass, got {cls!r}")
    if not isinstance(variant, ConvVariant):
        raise TypeError(f"variant must be a convpeft ConvVariant, got {type(variant).__name__}")
    if variant.weight is not None and variant.input_pad is not None and variant.plain is None:
        raise ValueError(
            f"conv variant {variant.name!r} transforms its weight and pads its input by the "
            "input size: merging must replace the layer by a plain one that pads the same way, "
            "which convpeft cannot build by itself; pass plain=(module, weight) -> nn.Module")
    old = _REGISTRY.get(cls)
    if old is not None and old is not variant:
        raise ValueError(f"{_dotted(cls)} is already registered as conv variant {old.name!r}; "
                         "a class has one variant: register a subclass of it instead")
    _REGISTRY[cls] = variant


def _owner(cls: type, attr: str) -> type:
    return next(k for k in cls.__mro__ if attr in k.__dict__)


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_conv_variant(m: nn.Conv2d) -> ConvVariant | None:
    """The variant of conv ``m`` (:data:`PLAIN` for ``nn.Conv2d``'s own forward), or ``None``
    if its class overrides ``forward``/``_conv_forward`` and is not registered."""
    cls = type(m)
    if _owner(cls, "_conv_forward") is not nn.Conv2d:
        return None
    fwd = _owner(cls, "forward")
    variant = PLAIN if fwd is nn.Conv2d else _REGISTRY.get(fwd) or _BUILTIN.get(_dotted(fwd))
    if variant is not None and variant.folds and parametrize.is_parametrized(m, "weight"):
        # m.weight is computed from the parametrisation: usable, but nothing to write back into
        variant = replace(variant, name=f"parametrized {variant.name}",
                          weight=lambda mod: mod.weight)
    return variant


def _refusal(name: str, m: nn.Module, base: str, register: str) -> str:
    where = f"layer {name!r}" if name else "this layer"
    cls = type(m)
    return (f"{where} is a {cls.__module__}.{cls.__qualname__}, an {base} subclass with its own "
            f"forward, which convpeft cannot reproduce exactly (an adapter or merge could be "
            f"silently wrong). Exclude it (exclude=[{('^' + re.escape(name) + '$')!r}]) or, if "
            f"you know what it computes, {register}")


def conv_variant(m: nn.Conv2d, name: str = "") -> ConvVariant:
    """The :class:`ConvVariant` of ``m``; raises :class:`UnsupportedLayerError` naming ``m``'s
    class (and the layer ``name``) if it has an unregistered ``forward``."""
    variant = registered_conv_variant(m)
    if variant is None:
        raise UnsupportedLayerError(_refusal(
            name, m, "nn.Conv2d", "describe it with convpeft.core.conv_variants."
            "register_conv_variant(cls, ConvVariant(...))"))
    return variant


def check_supported_layer(name: str, m: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` if ``m`` (a conv or linear layer) has a ``forward``
    an adapter cannot reproduce: an unregistered ``nn.Conv2d`` subclass (:func:`conv_variant`)
    or an ``nn.Linear`` subclass that overrides ``forward``."""
    if isinstance(m, nn.Conv2d):
        conv_variant(m, name)
    elif isinstance(m, nn.Linear) and _owner(type(m), "forward") is not nn.Linear:
        raise UnsupportedLayerError(_refusal(
            name, m, "nn.Linear", "wrap its extra computation in a separate module"))
