"""Autograd Functions for frozen convs and norms that save only what their backward needs
(see :mod:`convpeft.memory.lean`; the activations are in :mod:`.masks`).

Each runs the same kernel as the plain op in ``forward`` (so outputs are bit-identical) and
computes the same input gradient in ``backward``; what differs is what sits in ``ctx`` between
the two. None of them reads a tensor's values in Python, so they run on the ``meta`` device
(the analytic profiler traces lean models there). Under ``torch.autocast`` they compute what the
plain op would (the conv in autocast's dtype; pad and the per-channel affine in their input's
dtype, which autocast leaves alone) and return gradients in their inputs' dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from convpeft.core.amp import autocast_dtype, cast, no_autocast

__all__ = ["CHUNK_BYTES", "channel_affine", "chunked_conv2d", "conv2d_input_chunked",
           "frozen_conv2d", "in_func_transform", "pad2d"]

def in_func_transform() -> bool:
    """Are we inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``...)? Lean's
    Functions (and the chunked conv) then step aside for the plain op: their masks and offsets
    reinterpret storage (``view(torch.int64)`` of bytes, ``storage_offset``) and slice the
    batch, which ``vmap`` cannot batch; per-sample gradients stay exact, without the saving."""
    # torch.compile traces under an interpreter of its own: not a transform of the user's
    return (torch._C._functorch.peek_interpreter_stack() is not None
            and not torch.compiler.is_compiling())


def _shape_stub(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A zero-stride tensor of ``shape`` (one element of storage) for backward kernels that
    take the forward input only for its shape."""
    return like.new_zeros(()).expand(shape)


# ----------------------------------------------------------------------------- conv

CHUNK_BYTES = 16 * 2**20
"""Largest input gradient one conv backward call computes at once (batch chunks above it).

Why: a conv backward on CPU converts its operands to oneDNN's blocked layout and back, so while
it runs the device holds a blocked twin of the input gradient and of the output gradient beside
the tensors themselves (measured: MobileNetV2's first stride-2 depthwise conv at batch
64 x 224x224 takes 367 MiB of such scratch for a 294 MiB input gradient; ResNet18's strided 1x1
downsample, 3x its input gradient). The input gradient of sample ``n`` depends on sample ``n``
only, so computing it in batch chunks into one preallocated tensor gives the same values
bit for bit (the kernel runs per sample alike) while the scratch scales with the chunk; a weight
gradient is the sum of the chunks' (equal up to float rounding)."""


def _chunks(n: int, nbytes: int) -> list[tuple[int, int]]:
    k = max(1, min(n, -(-nbytes // CHUNK_BYTES)))
    step = -(-n // k)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _touched(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every page written once. Why: an untouched allocation holds no physical
    memory until its chunks are copied in, so the process's peak RSS would sit below what the
    allocator counts; writing it up front keeps the two the same (the allocator's figure, which
    the profiler and the planner read, stays the physical one), for a memset's time."""
    return t.zero_() if t.device.type == "cpu" else t


def conv2d_input_chunked(shape: Sequence[int], weight: torch.Tensor, gy: torch.Tensor,
                         stride, padding, dilation, groups: int) -> torch.Tensor:
    """``torch.nn.grad.conv2d_input`` in batch chunks of at most :data:`CHUNK_BYTES` of input
    gradient each, written into one ``shape`` tensor (bit-identical to the one call)."""
    n = shape[0]
    spans = _chunks(n, math.prod(shape) * gy.element_size())
    if len(spans) == 1:
        return torch.nn.grad.conv2d_input(shape, weight, gy, stride, padding, dilation, groups)
    gx = _touched(gy.new_empty(shape))
    for i, j in spans:
        gx[i:j].copy_(torch.nn.grad.conv2d_input((j - i, *shape[1:]), weight, gy[i:j], stride,
                                                 padding, dilation, groups))
    return gx


class _ChunkedConv(torch.autograd.Function):
    """``F.conv2d`` whose backward runs in batch chunks (:data:`CHUNK_BYTES`): the input gradient
    chunk by chunk into one tensor, the weight gradient summed over the chunks. Saves what
    autograd's conv saves (input and weight). Not used under autocast (the plain conv runs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geom = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = None
        spans = _chunks(x.shape[0], x.numel() * x.element_size())
        for i, j in spans:
            gxi, gwi, _ = torch.ops.aten.convolution_backward(
                gy[i:j], x[i:j], weight, None, stride, padding, dilation, False, [0, 0], groups,
                [need_x, need_w, False])
            if need_x:
                if len(spans) == 1:
                    gx = gxi
                else:
                    gx = _touched(x.new_empty(x.shape)) if gx is None else gx
                    gx[i:j].copy_(gxi)
            if need_w:
                gw = gwi if gw is None else gw.add_(gwi)
        gb = gy.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return gx, gw, gb, None, None, None, None


def chunked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   groups: int) -> torch.Tensor:
    """``F.conv2d`` (numeric ``padding``) whose backward works in batch chunks where the input is
    larger than :data:`CHUNK_BYTES` (see there); the plain conv otherwise, under autocast, or
    with nothing to differentiate."""
    if (not torch.is_grad_enabled() or autocast_dtype(x) is not None
            or x.numel() * x.element_size() <= CHUNK_BYTES or in_func_transform()
            or not any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _ChunkedConv.apply(x, weight, bias, stride, padding, dilation, groups)



class _FrozenConv(torch.autograd.Function):
    """conv2d with frozen weight and bias: saves the weight (resident anyway), not the input.
    ``grad_x`` is the transposed convolution of ``grad_y`` with ``W``; it needs only x's shape.

    Under autocast (see :mod:`convpeft.core.amp`) the conv runs in autocast's dtype and ``y`` comes
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
        gx = conv2d_input_chunked(shape, weight, gy.to(weight.dtype), stride, padding,
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
