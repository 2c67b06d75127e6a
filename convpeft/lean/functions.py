"""Autograd Functions for frozen convs and norms that save only what their backward needs
(see :mod:`convpeft.lean`; the activations are in :mod:`.masks`).

Each runs the same kernel as the plain op in ``forward`` (so outputs are bit-identical) and
computes the same input gradient in ``backward``; what differs is what sits in ``ctx`` between
the two. None of them reads a tensor's values in Python, so they run on the ``meta`` device
(the analytic profiler traces lean models there). Under ``torch.autocast`` they compute what the
plain op would (the conv in autocast's dtype; pad and the per-channel affine in their input's
dtype, which autocast leaves alone) and return gradients in their inputs' dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..amp import autocast_dtype, cast, no_autocast

__all__ = ["channel_affine", "frozen_conv2d", "pad2d"]

def _shape_stub(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A zero-stride tensor of ``shape`` (one element of storage) for backward kernels that
    take the forward input only for its shape."""
    return like.new_zeros(()).expand(shape)


# ----------------------------------------------------------------------------- conv


class _FrozenConv(torch.autograd.Function):
    """conv2d with frozen weight and bias: saves the weight (resident anyway), not the input.
    ``grad_x`` is the transposed convolution of ``grad_y`` with ``W``; it needs only x's shape.

    Under autocast (see :mod:`convpeft.amp`) the conv runs in autocast's dtype and ``y`` comes
    out in it; the *stored* weight is what is saved and is cast again in backward, so nothing
    but the resident weight is kept between the passes; ``grad_x`` is returned in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dt = autocast_dtype(x)
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, list(stride), list(padding), list(dilation), groups)
        ctx.dtypes = (x.dtype, dt)
        with no_autocast(x):
            return F.conv2d(cast(x, dt), cast(weight, dt), cast(bias, dt), stride, padding,
                            dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        x_dtype, dt = ctx.dtypes
        weight = cast(weight, dt)
        gx = torch.nn.grad.conv2d_input(shape, weight, gy.to(weight.dtype), stride, padding,
                                        dilation, groups)
        return cast(gx, x_dtype), None, None, None, None, None, None


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
