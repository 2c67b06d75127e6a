"""Max pooling that keeps one byte per output for backward instead of its input and int64 indices.

torch's ``max_pool2d`` saves its input (fp32) *and* the int64 argmax indices; its backward
kernel reads only the input's shape and the indices. Every index lies in its output's pooling
window, so the window offset ``di * k_w + dj`` (< ``k_h * k_w``, at most 256 here) says the same
in one ``uint8``: 12x less than the indices alone. ResNet's stem max pool (64 x 112^2 -> 56^2)
saved 3 * 4 + 8 = 20 bytes per output; now 1.

Forward runs the same kernel (``max_pool2d_with_indices``; outputs identical) and encodes the
offsets; backward decodes the int64 indices and runs torch's own backward kernel, so gradients
are those of the plain op, ties included. Both run over batch chunks so that the int64
transients stay about :data:`convpeft.ops.masks.CHUNK` elements. Integer arithmetic only, no
value read in Python: meta-safe.
"""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

from convpeft.ops.masks import CHUNK

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


def _displacements(kernel, dilation, w_in: int) -> list[int]:
    """Flat displacement ``di * dil_h * W + dj * dil_w`` of each window offset
    ``di * k_w + dj`` from the window's top-left element."""
    kh, kw = kernel
    return [di * dilation[0] * w_in + dj * dilation[1] for di in range(kh) for dj in range(kw)]


class _LeanMaxPool(torch.autograd.Function):
    """Offsets by table look-up where the displacements are distinct (a window narrower than
    the input, i.e. every real case): forward ``offset = LUT[index - top_left]``, backward
    ``index = top_left + DISP[offset]``, one gather each instead of integer divisions (3x
    faster on the stem pool of ResNet18). Otherwise by division, row and column apart."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = _aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        n, c, ho, wo = y.shape
        w_in = x.shape[-1]
        oh, ow = _bases(idx, ho, wo, stride, padding)
        disp = _displacements(kernel, dilation, w_in)
        lookup = len(set(disp)) == len(disp)
        if lookup:
            top_left = oh * w_in + ow  # (Ho, Wo), may be < 0 (padding)
            lut = torch.zeros(max(disp) + 1, dtype=torch.uint8, device=idx.device)
            lut[torch.tensor(disp, device=idx.device)] = torch.arange(
                len(disp), dtype=torch.uint8, device=idx.device)
        off = torch.empty(idx.shape, dtype=torch.uint8, device=idx.device)
        for a, b in _chunks(n, c * ho * wo):
            i = idx[a:b]
            if lookup:  # index_select: several times faster than lut[r] on CPU
                off[a:b] = lut.index_select(0, (i - top_left).reshape(-1)).view(i.shape)
                continue
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
        top_left = oh * w_in + ow
        disp = torch.tensor(_displacements(kernel, dilation, w_in), device=gy.device)
        gx = gy.new_empty(shape)
        stub = gy.new_zeros(()).expand(shape)
        for a, b in _chunks(n, c * ho * wo):
            o = off[a:b]
            idx = disp.index_select(0, o.reshape(-1).to(torch.int64)).view(o.shape) + top_left
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
