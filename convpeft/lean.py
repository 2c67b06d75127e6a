"""Memory-lean activations: frozen layers save only what their backward pass needs.

Autograd saves what an op's backward *could* need, not what this update needs. Once most of a
CNN is frozen (head-only, BitFit, LoRA/DoRA, BN frozen) that is most of the activation memory:

* a conv whose weight and bias are frozen still saves its whole input, though the input
  gradient needs only the weight: ``grad_x = conv_transpose(grad_y, W)``;
* a BatchNorm in eval mode with a frozen (or no) affine saves its input, though it is the
  per-channel affine map ``y = x * s + t`` whose input gradient is ``grad_y * s``;
* ReLU, ReLU6, LeakyReLU and Hardtanh save a full fp32 tensor where one bit per element
  (where the gradient passes, or which slope applies) carries the same information.

:func:`lean_activations` swaps, in place, the ``forward`` of such modules for one that runs
through a small autograd Function saving only that: the (already resident) frozen weight, the
per-channel scale, or a packed 1-bit mask (32x smaller than fp32). Outputs and every gradient
are those of the plain model (the same kernels run, in the same order). Nothing is
re-parameterised: ``state_dict`` keys and values are unchanged, and :meth:`LeanReport.undo`
(or :func:`restore_activations`) puts the plain ``forward`` back.

What stays plain, and why:

* a conv that is the ``base_layer`` of an adapter: the adapter's ``A`` needs the input for its
  own gradient, and the wrapper computes both from the one saved tensor (never saved twice);
* a conv with ``padding_mode != "zeros"`` or a non-``nn.Conv2d`` subclass (its ``forward`` may
  do more than a convolution), a BN with a trainable affine (its weight gradient needs the
  normalised input), and a BN while it is in train mode (batch statistics need the input; this
  is checked on every call, so ``model.train()``/``eval()`` after this works as expected);
* a layer made lean and *unfrozen later*: its lean forward checks ``requires_grad`` on every
  call and falls back to the plain forward, so a gradient is never silently wrong.

Works on the ``meta`` device (no data-dependent Python), so the profiler's analytic mode
predicts the memory of lean updates.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from .layer_kinds import layer_kind

__all__ = ["LeanReport", "LeanRow", "frozen_conv2d", "lean_activations",
           "restore_activations", "saved_bytes_by_layer"]

_MARK = "_convpeft_lean"  # attribute on a lean module: what was done ("conv", "norm", "act")
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# ----------------------------------------------------------------------------- 1-bit masks


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool`` tensor of any shape -> ``uint8`` of ``ceil(numel / 8)`` bytes, 8 flags a byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _BITS.to(flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the ``bool`` tensor of ``shape``."""
    bits = _BITS.to(packed.device)
    n = 1
    for s in shape:
        n *= s
    return (packed.unsqueeze(1) & bits).ne(0).reshape(-1)[:n].view(shape)


# ----------------------------------------------------------------------------- Functions


class _FrozenConv(torch.autograd.Function):
    """conv2d with frozen weight and bias: saves the weight (resident anyway), not the input.
    ``grad_x`` is the transposed convolution of ``grad_y`` with ``W``; it needs only x's shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        gx = torch.nn.grad.conv2d_input(shape, weight, gy, stride, padding, dilation, groups)
        return gx, None, None, None, None, None, None


class _ChannelAffine(torch.autograd.Function):
    """``y = x * scale + shift`` per channel of ``(N, C, H, W)``; saves only ``scale (C,)``."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(scale)
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, gy):
        (scale,) = ctx.saved_tensors
        return gy * scale.view(1, -1, 1, 1), None, None


class _Clamp(torch.autograd.Function):
    """ReLU / ReLU6 / Hardtanh: ``clamp(x, lo, hi)``; the gradient passes where
    ``lo < x < hi`` (torch's ``hardtanh_backward`` rule), kept as a packed 1-bit mask."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        mask = (x > lo) & (x < hi) if hi is not None else x > lo
        ctx.save_for_backward(pack_mask(mask))
        ctx.shape = x.shape
        return x.clamp(lo, hi) if hi is not None else x.clamp_min(lo)

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        return gy * unpack_mask(packed, ctx.shape).to(gy.dtype), None, None


class _LeakyReLU(torch.autograd.Function):
    """LeakyReLU: the gradient is ``gy`` where ``x > 0``, ``slope * gy`` elsewhere (1 bit)."""

    @staticmethod
    def forward(ctx, x, slope):
        pos = x > 0
        ctx.save_for_backward(pack_mask(pos))
        ctx.shape, ctx.slope = x.shape, slope
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        pos = unpack_mask(packed, ctx.shape)
        return torch.where(pos, gy, gy * ctx.slope), None


def frozen_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride, padding, dilation, groups: int) -> torch.Tensor:
    """``F.conv2d`` for a frozen ``weight``/``bias`` that saves no input for backward (only
    ``grad_x`` flows). The caller guarantees neither ``weight`` nor ``bias`` requires grad."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _FrozenConv.apply(x, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- forwards


def _frozen(*params: torch.Tensor | None) -> bool:
    return not any(p is not None and p.requires_grad for p in params)


def _records(x: torch.Tensor) -> bool:
    """Would autograd record an op on ``x``? (If not, the plain path saves nothing.)"""
    return torch.is_grad_enabled() and x.requires_grad


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if not (_records(x) and _frozen(self.weight, self.bias)):
        return nn.Conv2d.forward(self, x)  # unfrozen later, or nothing to save: plain path
    return _FrozenConv.apply(x, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups)


def _norm_forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if self.training or not _records(x) or not _frozen(self.weight, self.bias):
        return type(self).forward(self, x)
    with torch.no_grad():
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
    return _ChannelAffine.apply(x, scale.to(x.dtype), shift.to(x.dtype))


def _clamp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _records(x):
        return type(self).forward(self, x)
    if isinstance(self, nn.ReLU):
        return _Clamp.apply(x, 0.0, None)
    return _Clamp.apply(x, float(self.min_val), float(self.max_val))  # Hardtanh, ReLU6


def _leaky_forward(self: nn.LeakyReLU, x: torch.Tensor) -> torch.Tensor:
    if not _records(x):
        return nn.LeakyReLU.forward(self, x)
    return _LeakyReLU.apply(x, float(self.negative_slope))


# exact types: a subclass's forward may do more than the op we replace it with
_LEAN_FORWARDS: dict[type, tuple[str, Callable]] = {
    nn.Conv2d: ("conv", _conv_forward),
    nn.BatchNorm2d: ("norm", _norm_forward),
    nn.ReLU: ("act", _clamp_forward),
    nn.ReLU6: ("act", _clamp_forward),
    nn.Hardtanh: ("act", _clamp_forward),
    nn.LeakyReLU: ("act", _leaky_forward),
}


# ----------------------------------------------------------------------------- API


@dataclass
class LeanRow:
    """One layer: ``action`` is ``"conv"``, ``"norm"``, ``"act"`` when made lean, else
    ``"plain"`` with ``reason``. ``kind`` uses :mod:`convpeft.layer_kinds` for convs."""

    name: str
    module: str
    action: str
    kind: str | None = None
    reason: str = ""


@dataclass
class LeanReport:
    """What :func:`lean_activations` did; ``undo()`` restores the plain forwards."""

    rows: list[LeanRow] = field(default_factory=list)
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def lean(self) -> list[LeanRow]:
        return [r for r in self.rows if r.action != "plain"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def undo(self) -> None:
        for m in self._modules:
            _restore(m)
        self._modules.clear()


def _restore(m: nn.Module) -> None:
    if getattr(m, _MARK, None) is not None:
        m.__dict__.pop("forward", None)
        delattr(m, _MARK)


def _plain_reason(name: str, m: nn.Module, adapted_bases: set[str],
                  convs: bool, norms: bool, activations: bool) -> str:
    action = _LEAN_FORWARDS[type(m)][0]
    if not {"conv": convs, "norm": norms, "act": activations}[action]:
        return f"{action}s=False"
    if action == "conv":
        if name in adapted_bases:
            return "adapter base layer: its input is saved once for the adapter's A"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}"
        if not _frozen(m.weight, m.bias):
            return "trainable weight or bias"
    if action == "norm":
        # train/eval is decided per call (model.train() comes after this, in most loops): a
        # BN in train mode runs its plain forward, since batch statistics need the input
        if m.running_var is None:
            return "no running statistics (batch statistics need the input)"
        if not _frozen(m.weight, m.bias):
            return "trainable affine (its weight gradient needs the normalised input)"
    return ""


def lean_activations(model: nn.Module, *, convs: bool = True, norms: bool = True,
                     activations: bool = True) -> LeanReport:
    """Make ``model``'s frozen convs, frozen eval-mode BatchNorms and piecewise-linear
    activations save only what backward needs (see the module docstring), in place.

    Decided per layer *now*: freeze parameters and put BN in eval mode first (e.g. with
    :func:`convpeft.methods.prepare` and ``bn="freeze"``). Calling it again re-decides.
    A layer unfrozen later falls back to its plain forward on its own. Returns a
    :class:`LeanReport`; ``report.undo()`` restores every plain forward.
    """
    restore_activations(model)
    adapted_bases = {f"{n}.base_layer" if n else "base_layer"
                     for n, m in model.named_modules() if hasattr(m, "base_layer")}
    report = LeanReport()
    for name, m in model.named_modules():
        spec = _LEAN_FORWARDS.get(type(m))
        if spec is None:
            continue
        action, fwd = spec
        reason = _plain_reason(name, m, adapted_bases, convs, norms, activations)
        kind = layer_kind(m) if action == "conv" else None
        if reason:
            report.rows.append(LeanRow(name, type(m).__name__, "plain", kind, reason))
            continue
        m.forward = types.MethodType(fwd, m)
        setattr(m, _MARK, action)
        report._modules.append(m)
        report.rows.append(LeanRow(name, type(m).__name__, action, kind))
    return report


def restore_activations(model: nn.Module) -> int:
    """Undo :func:`lean_activations` on every module of ``model``; returns how many."""
    n = 0
    for m in model.modules():
        if getattr(m, _MARK, None) is not None:
            _restore(m)
            n += 1
    return n


def saved_bytes_by_layer(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Bytes autograd keeps for backward after one forward of ``example_input``, by the
    innermost module that saved them (``""``: outside any module, e.g. the loss).

    Each storage counts once, for the first layer that saves it; parameters and buffers are
    left out (resident anyway), so this is the activation memory a backward pass pins.
    """
    resident = {t.untyped_storage().data_ptr() for t in
                [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    stack: list[str] = [""]
    out: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s.data_ptr()
        if s.nbytes() and key not in resident and key not in seen:
            seen.add(key)
            out[stack[-1]] = out.get(stack[-1], 0) + s.nbytes()
        return t

    def enter(name: str) -> Callable:
        def hook(*_args) -> None:
            stack.append(name)
        return hook

    def leave(*_args) -> None:  # returning None keeps the module's output
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return out
