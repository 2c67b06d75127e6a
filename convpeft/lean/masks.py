"""1-bit masks for piecewise-linear activations (ReLU, ReLU6, Hardtanh, LeakyReLU).

Their input gradient is ``grad_y`` times a per-element factor that takes one of two values
(0/1, or slope/1), so one bit per element is all backward needs: 32x less than the fp32
tensor torch saves. Two things keep this cheap:

* flags come from the float's bits, not a comparison: an IEEE float is positive iff its
  same-size integer image is (``+0`` -> 0; ``-0`` and negatives < 0). On CPU ``t > 0`` is about
  4x slower than ``relu`` (its bool output is not vectorised); the integer route is not;
* 8 flags are packed into a byte with two int64 ops (see ``_GATHER``), not a reduction.

Both passes run over chunks of :data:`CHUNK` elements, so the transients (flags, integer
images) stay a few MiB however large the activation: the peak of a lean update is what it
saves, not what it computes on the way. Nothing reads a value in Python: meta-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CHUNK", "clamp_masked", "leaky_relu_masked", "pack_mask", "unpack_mask"]

CHUNK = 1 << 20  # elements per pass (a multiple of 8): transients of ~5 bytes x CHUNK

# Read as one little-endian int64, 8 flags b_i in {0, 1} are sum(b_i << 8 i). Multiplying by
# _GATHER (byte j = 1 << (7 - j)) sends b_i to bit 56 + i of the product, with no carries (the
# partial products of one byte land on distinct bits), so ``>> 56`` leaves b_i at bit i.
# Unpacking copies the byte into all 8 bytes (``* _SPREAD``, no carries since it is < 256) and
# keeps bit i in byte i (``& _SELECT``).
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as a signed int64: byte i = 1 << i
_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _pack_bytes(flags: torch.Tensor) -> torch.Tensor:
    """``uint8`` 0/1 flags (1-D) -> packed bytes, flag ``8 k + i`` at bit ``i`` of byte ``k``."""
    pad = (-flags.numel()) % 8
    if pad or flags.storage_offset() % 8:
        flags = F.pad(flags, (0, pad))
    return ((flags.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack_u8(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes -> the first ``n`` flags as 1-D ``uint8`` 0/1."""
    bytes_ = (packed.to(torch.int64) * _SPREAD).bitwise_and_(_SELECT).view(torch.uint8)
    return bytes_[:n].clamp_max_(1)


def _positive(t: torch.Tensor) -> torch.Tensor:
    """``uint8`` 1 where float ``t > 0`` else 0 (a NaN counts as its sign bit says; the plain
    backward passes the gradient at a NaN, the mask may not)."""
    int_type = _SAME_SIZE_INT.get(t.dtype)
    if int_type is None:
        return t.gt(0).view(torch.uint8)
    return t.view(int_type).clamp(0, 1).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool`` tensor of any shape -> ``uint8`` of ``ceil(numel / 8)`` bytes, 8 flags a byte
    (flag ``8 k + i`` at bit ``i`` of byte ``k``, as ``numpy.packbits(bitorder="little")``)."""
    return _pack_bytes(mask.reshape(-1).view(torch.uint8))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the ``bool`` tensor of ``shape``."""
    return _unpack_u8(packed, _numel(shape)).view(torch.bool).view(tuple(shape))


def _chunked_flags(t: torch.Tensor, room) -> torch.Tensor:
    """Pack ``room(chunk) > 0`` over ``t`` flattened, CHUNK elements at a time."""
    flat = t.reshape(-1)
    n = flat.numel()
    out = flat.new_empty((n + 7) // 8, dtype=torch.uint8)
    for s in range(0, n, CHUNK):
        out[s // 8:(min(s + CHUNK, n) + 7) // 8] = _pack_bytes(_positive(room(flat[s:s + CHUNK])))
    return out


def _chunked_grad(gy: torch.Tensor, packed: torch.Tensor, factor) -> torch.Tensor:
    """``grad_x = grad_y * factor(flags)`` over chunks of ``grad_y`` flattened."""
    g = gy.reshape(-1)
    n = g.numel()
    gx = torch.empty_like(g)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        torch.mul(g[s:e], factor(_unpack_u8(packed[s // 8:(e + 7) // 8], e - s)), out=gx[s:e])
    return gx.view(gy.shape)


class _Clamp(torch.autograd.Function):
    """ReLU / ReLU6 / Hardtanh: ``y = clamp(x, lo, hi)``; the gradient passes where
    ``lo < y < hi`` (torch's ``threshold_backward``/``hardtanh_backward`` rule), i.e. where
    ``min(y - lo, hi - y) > 0`` (exact in floats: ``a != b`` implies ``a - b != 0``), kept as a
    packed 1-bit mask. ``inplace`` clamps ``x`` itself, as ``nn.ReLU(inplace=True)`` does."""

    @staticmethod
    def forward(ctx, x, lo, hi, inplace):
        ctx.shape = x.shape
        if inplace:
            ctx.mark_dirty(x)
            y = x.clamp_(lo, hi) if hi is not None else x.clamp_min_(lo)
        else:
            y = x.clamp(lo, hi) if hi is not None else x.clamp_min(lo)

        def room(c: torch.Tensor) -> torch.Tensor:
            below = c if lo == 0 else c - lo
            return below if hi is None else torch.minimum(torch.rsub(c, hi), below)

        ctx.save_for_backward(_chunked_flags(y, room))
        return y

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        return _chunked_grad(gy, packed, lambda f: f), None, None, None


class _LeakyReLU(torch.autograd.Function):
    """LeakyReLU: the gradient is ``gy`` where ``x > 0``, ``slope * gy`` elsewhere (1 bit)."""

    @staticmethod
    def forward(ctx, x, slope, inplace):
        ctx.save_for_backward(_chunked_flags(x, lambda c: c))  # before x may be overwritten
        ctx.shape, ctx.slope = x.shape, slope
        if inplace:
            ctx.mark_dirty(x)
            return F.leaky_relu_(x, slope)
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        slope = ctx.slope

        def factor(f: torch.Tensor) -> torch.Tensor:
            return f.to(gy.dtype).mul_(1 - slope).add_(slope)

        return _chunked_grad(gy, packed, factor), None, None


def clamp_masked(x: torch.Tensor, lo: float, hi: float | None, inplace: bool = False):
    """``clamp(x, lo, hi)`` (``hi=None``: ReLU) saving a 1-bit mask for backward."""
    return _Clamp.apply(x, lo, hi, inplace)


def leaky_relu_masked(x: torch.Tensor, slope: float, inplace: bool = False):
    """``leaky_relu(x, slope)`` saving a 1-bit mask for backward."""
    return _LeakyReLU.apply(x, slope, inplace)
