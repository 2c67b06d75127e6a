"""Autograd Functions that save only what their backward needs (see :mod:`convpeft.lean`).

Each runs the same kernel as the plain op in ``forward`` (so outputs are bit-identical) and
computes the same input gradient in ``backward``; what differs is what sits in ``ctx`` between
the two. None of them reads a tensor's values in Python, so they run on the ``meta`` device
(the analytic profiler traces lean models there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["frozen_conv2d", "pack_mask", "pad2d", "unpack_mask"]

_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- 1-bit masks


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool`` tensor of any shape -> ``uint8`` of ``ceil(numel / 8)`` bytes, 8 flags a byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the ``bool`` tensor of ``shape``."""
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    n = 1
    for s in shape:
        n *= s
    return (packed.unsqueeze(1) & bits).ne(0).reshape(-1)[:n].view(tuple(shape))


def _shape_stub(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A zero-stride tensor of ``shape`` (one element of storage) for backward kernels that
    take the forward input only for its shape."""
    return like.new_zeros(()).expand(shape)


# ----------------------------------------------------------------------------- conv


class _FrozenConv(torch.autograd.Function):
    """conv2d with frozen weight and bias: saves the weight (resident anyway), not the input.
    ``grad_x`` is the transposed convolution of ``grad_y`` with ``W``; it needs only x's shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, list(stride), list(padding), list(dilation), groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        gx = torch.nn.grad.conv2d_input(shape, weight, gy, stride, padding, dilation, groups)
        return gx, None, None, None, None, None, None


def frozen_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int) -> torch.Tensor:
    """``F.conv2d`` for a frozen ``weight``/``bias`` that saves no input for backward (only
    ``grad_x`` flows). ``padding`` must be numeric (pad ``'same'`` first with :func:`pad2d`).
    The caller guarantees neither ``weight`` nor ``bias`` requires grad."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _FrozenConv.apply(x, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- padding

_PAD_BACKWARD = {
    "reflect": torch.ops.aten.reflection_pad2d_backward,
    "replicate": torch.ops.aten.replication_pad2d_backward,
}


class _ShapePad(torch.autograd.Function):
    """Reflect/replicate padding that saves nothing: torch's own pad saves its input, though
    the backward kernel reads only its shape."""

    @staticmethod
    def forward(ctx, x, pad, mode):
        ctx.shape, ctx.pad, ctx.mode = x.shape, list(pad), mode
        return F.pad(x, pad, mode=mode)

    @staticmethod
    def backward(ctx, gy):
        stub = _shape_stub(gy, ctx.shape)
        return _PAD_BACKWARD[ctx.mode](gy.contiguous(), stub, ctx.pad), None, None


def pad2d(x: torch.Tensor, pad: Sequence[int], mode: str) -> torch.Tensor:
    """``F.pad(x, pad, mode)`` (``pad`` as in ``F.pad``; ``mode`` a conv ``padding_mode``)
    saving no tensor: zero and circular padding save nothing in torch either (slices and
    cat), reflect/replicate go through :class:`_ShapePad`."""
    if mode == "zeros":
        return F.pad(x, pad)
    if mode in _PAD_BACKWARD and torch.is_grad_enabled() and x.requires_grad:
        return _ShapePad.apply(x, pad, mode)
    return F.pad(x, pad, mode=mode)


# ----------------------------------------------------------------------------- norm


class _ChannelAffine(torch.autograd.Function):
    """``y = x * scale + shift`` per channel of ``(N, C, H, W)``; saves only ``scale (C,)``.
    ``scale`` is constant; ``shift`` may require grad (a trainable BN bias, as in BitFit):
    its gradient is ``grad_y`` summed over N, H, W, which needs nothing saved either."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(scale)
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, gy):
        (scale,) = ctx.saved_tensors
        gx = gy * scale.view(1, -1, 1, 1) if ctx.needs_input_grad[0] else None
        gshift = gy.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return gx, None, gshift


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel, saving only ``scale`` (``scale`` must not need grad)."""
    return _ChannelAffine.apply(x, scale, shift)


# ----------------------------------------------------------------------------- activations


class _Clamp(torch.autograd.Function):
    """ReLU / ReLU6 / Hardtanh: ``clamp(x, lo, hi)``; the gradient passes where
    ``lo < x < hi`` (torch's ``hardtanh_backward``/``threshold_backward`` rule), kept as a
    packed 1-bit mask. ``inplace`` clamps ``x`` itself, as ``nn.ReLU(inplace=True)`` does."""

    @staticmethod
    def forward(ctx, x, lo, hi, inplace):
        mask = x > lo
        if hi is not None:
            mask &= x < hi
        ctx.save_for_backward(pack_mask(mask))
        ctx.shape = x.shape
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(lo, hi) if hi is not None else x.clamp_min_(lo)
        return x.clamp(lo, hi) if hi is not None else x.clamp_min(lo)

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        return gy * unpack_mask(packed, ctx.shape), None, None, None


class _LeakyReLU(torch.autograd.Function):
    """LeakyReLU: the gradient is ``gy`` where ``x > 0``, ``slope * gy`` elsewhere (1 bit)."""

    @staticmethod
    def forward(ctx, x, slope, inplace):
        pos = x > 0
        ctx.save_for_backward(pack_mask(pos))
        ctx.shape, ctx.slope = x.shape, slope
        if inplace:
            ctx.mark_dirty(x)
            return F.leaky_relu_(x, slope)
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        pos = unpack_mask(packed, ctx.shape)
        return torch.where(pos, gy, gy * ctx.slope), None, None


def clamp_masked(x: torch.Tensor, lo: float, hi: float | None, inplace: bool = False):
    """``clamp(x, lo, hi)`` (``hi=None``: ReLU) saving a 1-bit mask for backward."""
    return _Clamp.apply(x, lo, hi, inplace)


def leaky_relu_masked(x: torch.Tensor, slope: float, inplace: bool = False):
    """``leaky_relu(x, slope)`` saving a 1-bit mask for backward."""
    return _LeakyReLU.apply(x, slope, inplace)
