"""Max pooling that keeps one byte per output for backward instead of its input and int64 indices.

torch's ``max_pool2d`` saves its input (fp32) *and* the int64 argmax indices; its backward
kernel reads only the input's shape and the indices. Every index lies in its output's pooling
window, so the window offset ``di * k_w + dj`` (< ``k_h * k_w``, at most 256 here) says the same
in one ``uint8``: 12x less than the indices alone. ResNet's stem max pool (64 x 112^2 -> 56^2)
saved 3 * 4 + 8 = 20 bytes per output; now 1.

Forward runs the same kernel (``max_pool2d_with_indices``; outputs identical) and encodes the
offsets; backward decodes the int64 indices and runs torch's own backward kernel, so gradients
are those of the plain op, ties included. Both run over batch chunks so that the int64
transients stay about :data:`convpeft.lean.masks.CHUNK` elements. Integer arithmetic only, no
value read in Python: meta-safe.
"""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

from .masks import CHUNK

__all__ = ["max_pool2d_lean", "pool_offsets_fit"]

_aten = torch.ops.aten


def pool_offsets_fit(kernel_size) -> bool:
    """Does a window offset fit in a ``uint8`` (``k_h * k_w <= 256``)?"""
    kh, kw = _pair(kernel_size)
    return kh * kw <= 256


def _chunks(n: int, per_sample: int):
    step = max(1, CHUNK // max(1, per_sample))
    for i in range(0, n, step):
        yield i, min(n, i + step)


def _bases(like: torch.Tensor, ho: int, wo: int, stride, padding):
    """Top-left input row of each output row ``(Ho, 1)`` and column ``(Wo,)`` (may be < 0)."""
    oh = torch.arange(ho, device=like.device, dtype=torch.int64) * stride[0] - padding[0]
    ow = torch.arange(wo, device=like.device, dtype=torch.int64) * stride[1] - padding[1]
    return oh.view(-1, 1), ow


class _LeanMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = _aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        n, c, ho, wo = y.shape
        w_in = x.shape[-1]
        oh, ow = _bases(idx, ho, wo, stride, padding)
        off = torch.empty(idx.shape, dtype=torch.uint8, device=idx.device)
        for a, b in _chunks(n, c * ho * wo):
            i = idx[a:b]
            ih = torch.div(i, w_in, rounding_mode="floor")
            iw = i - ih * w_in
            di = torch.div(ih - oh, dilation[0], rounding_mode="floor")
            dj = torch.div(iw - ow, dilation[1], rounding_mode="floor")
            off[a:b] = di * kernel[1] + dj
        del idx
        ctx.save_for_backward(off)
        ctx.geometry = (x.shape, kernel, stride, padding, dilation, ceil_mode)
        return y

    @staticmethod
    def backward(ctx, gy):
        (off,) = ctx.saved_tensors
        shape, kernel, stride, padding, dilation, ceil_mode = ctx.geometry
        gy = gy.contiguous()
        n, c, ho, wo = gy.shape
        w_in = shape[-1]
        oh, ow = _bases(gy, ho, wo, stride, padding)
        gx = gy.new_empty(shape)
        stub = gy.new_zeros(()).expand(shape)
        for a, b in _chunks(n, c * ho * wo):
            o = off[a:b].to(torch.int64)
            di = torch.div(o, kernel[1], rounding_mode="floor")
            dj = o - di * kernel[1]
            idx = (oh + di * dilation[0]) * w_in + (ow + dj * dilation[1])
            _aten.max_pool2d_with_indices_backward.grad_input(
                gy[a:b], stub[a:b], kernel, stride, padding, dilation, ceil_mode, idx,
                grad_input=gx[a:b])
        return gx, None, None, None, None, None


def max_pool2d_lean(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` on ``(N, C, H, W)`` that saves one ``uint8`` window offset per output
    for backward (see the module docstring); arguments as in ``F.max_pool2d`` (no indices
    returned). Needs ``k_h * k_w <= 256`` (:func:`pool_offsets_fit`)."""
    kernel = list(_pair(kernel_size))
    stride = list(_pair(stride if stride is not None else kernel_size))
    if not stride or stride == [0, 0]:
        stride = list(kernel)
    if not pool_offsets_fit(kernel):
        raise ValueError(f"max_pool2d_lean: kernel {tuple(kernel)} has more than 256 offsets")
    if x.dim() != 4:
        raise ValueError(f"max_pool2d_lean takes (N, C, H, W) input, got {tuple(x.shape)}")
    return _LeanMaxPool.apply(x, kernel, stride, list(_pair(padding)), list(_pair(dilation)),
                              bool(ceil_mode))
