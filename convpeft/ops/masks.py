"""1-bit masks for piecewise-linear activations (ReLU, ReLU6, Hardtanh, LeakyReLU).

Their input gradient is ``grad_y`` times a per-element factor that takes one of two values
(0/1, or slope/1), so one bit per element is all backward needs: 32x less than the fp32
tensor torch saves. Three things keep this cheap and exact:

* the flags come from torch's own backward kernel run on a constant gradient of ones
  (``hardtanh_backward(1, y, lo, hi)`` etc., one vectorised pass; the ones tensor is a
  zero-stride view of one element), so they say exactly where torch's backward passes the
  gradient, kinks, ``-0`` and NaN included; its 0/1 floats become ``bool`` in one more pass
  (a float -> bool cast is vectorised on CPU; a comparison such as ``t > 0`` is ~4x slower);
* 8 flags are packed into a byte with two int64 ops (see ``_GATHER``), not a reduction;
* backward unpacks into bytes that are non-zero where the gradient passes and hands them,
  as floats, to the same backward kernel as its "input": ``threshold_backward(gy, f, 0)``
  passes ``gy`` where ``f > 0`` (``leaky_relu_backward`` likewise with the slope), one pass.

Both passes run over chunks of :data:`CHUNK` elements, so the transients (flags, integer
images) stay a few MiB however large the activation: the peak of a lean update is what it
saves, not what it computes on the way. Nothing reads a value in Python: meta-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CHUNK", "clamp_masked", "leaky_relu_masked", "pack_mask", "unpack_mask"]

CHUNK = 1 << 20  # elements per pass (a multiple of 8): transients of ~6 bytes x CHUNK

_aten = torch.ops.aten

# Read as one little-endian int64, 8 flags b_i in {0, 1} are sum(b_i << 8 i). Multiplying by
# _GATHER (byte j = 1 << (7 - j)) sends b_i to bit 56 + i of the product, with no carries (the
# partial products of one byte land on distinct bits), so ``>> 56`` leaves b_i at bit i.
# Unpacking copies the byte into all 8 bytes (``* _SPREAD``, no carries since it is < 256) and
# keeps bit i in byte i (``& _SELECT``): byte i is then 0 or 1 << i, non-zero iff b_i.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as a signed int64: byte i = 1 << i


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _pack_bytes(flags: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """``uint8`` 0/1 flags (1-D) -> packed bytes, flag ``8 k + i`` at bit ``i`` of byte ``k``.
    ``fresh``: ``flags`` starts its own storage (no offset to check: ``storage_offset()`` is
    an int torch.compile cannot trace, a graph break per activation)."""
    pad = (-flags.numel()) % 8
    if pad or (not fresh and flags.storage_offset() % 8):
        flags = F.pad(flags, (0, pad))
    return ((flags.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack_nonzero(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes -> ``n`` ``uint8``, non-zero (``1 << (k % 8)``) where flag ``k`` is set."""
    return (packed.to(torch.int64) * _SPREAD).bitwise_and_(_SELECT).view(torch.uint8)[:n]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool`` tensor of any shape -> ``uint8`` of ``ceil(numel / 8)`` bytes, 8 flags a byte
    (flag ``8 k + i`` at bit ``i`` of byte ``k``, as ``numpy.packbits(bitorder="little")``)."""
    return _pack_bytes(mask.reshape(-1).view(torch.uint8))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the ``bool`` tensor of ``shape``."""
    return _unpack_nonzero(packed, _numel(shape)).to(torch.bool).view(tuple(shape))


def _chunked_flags(t: torch.Tensor, passes: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
    """Pack ``passes(ones, chunk) != 0`` over ``t`` flattened, CHUNK elements at a time;
    ``passes`` is an activation's backward kernel with ``chunk`` as its saved input."""
    flat = t.reshape(-1)
    n = flat.numel()
    ones = flat.new_ones(()).expand(min(n, CHUNK))

    def pack(c: torch.Tensor) -> torch.Tensor:
        # a new bool tensor: its own storage, offset 0
        return _pack_bytes(passes(ones[:c.numel()], c).to(torch.bool).view(torch.uint8),
                           fresh=True)

    if n <= CHUNK:
        return pack(flat)
    out = flat.new_empty((n + 7) // 8, dtype=torch.uint8)
    for s in range(0, n, CHUNK):
        out[s // 8:(min(s + CHUNK, n) + 7) // 8] = pack(flat[s:s + CHUNK])
    return out


def _chunked_grad(gy: torch.Tensor, packed: torch.Tensor,
                  backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``backward(grad_y chunk, flags as gy's dtype)`` over chunks of ``grad_y`` flattened."""
    g = gy.reshape(-1)
    n = g.numel()

    def grad(s: int, e: int) -> torch.Tensor:
        flags = _unpack_nonzero(packed[s // 8:(e + 7) // 8], e - s).to(g.dtype)
        return backward(g[s:e], flags)

    if n <= CHUNK:
        return grad(0, n).view(gy.shape)
    gx = torch.empty_like(g)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        gx[s:e] = grad(s, e)
    return gx.view(gy.shape)


def _passes_where_positive(g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _aten.threshold_backward(g, f, 0)


class _Clamp(torch.autograd.Function):
    """ReLU / ReLU6 / Hardtanh: ``y = clamp(x, lo, hi)``; the gradient passes where
    ``lo < y < hi`` (or NaN), as torch's ``threshold_backward``/``hardtanh_backward`` decide
    on ``y``, kept as a packed 1-bit mask. ``inplace`` clamps ``x`` itself, as
    ``nn.ReLU(inplace=True)`` does."""

    @staticmethod
    def forward(ctx, x, lo, hi, inplace, keep_output):
        if inplace:
            ctx.mark_dirty(x)
            # return x itself (torch.compile traces mark_dirty only when the dirty input is
            # what forward returns; clamp_'s result is x, but not to its tracer)
            if hi is not None:
                x.clamp_(lo, hi)
            else:
                x.clamp_min_(lo)
            y = x
        else:
            y = x.clamp(lo, hi) if hi is not None else x.clamp_min(lo)
        if hi is None:
            def passes(one, c):
                return _aten.threshold_backward(one, c, lo)
        else:
            def passes(one, c):
                return _aten.hardtanh_backward(one, c, lo, hi)
        ctx.passes, ctx.keep_output = passes, keep_output
        # keep_output: the consumer saves y anyway (an adapted or trainable conv), so saving
        # y too costs nothing while a mask would add 1/32 of it; backward reads the flags off
        # y with the same kernel (lo < y < hi iff lo < x < hi, NaN passing in both)
        ctx.save_for_backward(y if keep_output else _chunked_flags(y, passes))
        return y

    @staticmethod
    def backward(ctx, gy):
        (saved,) = ctx.saved_tensors
        if ctx.keep_output:
            gx = ctx.passes(gy, saved)
        else:
            gx = _chunked_grad(gy, saved, _passes_where_positive)
        return gx, None, None, None, None


class _LeakyReLU(torch.autograd.Function):
    """LeakyReLU: the gradient is ``gy`` where ``x > 0``, ``slope * gy`` elsewhere (NaN
    included, as torch's ``leaky_relu_backward`` decides), kept as a 1-bit mask."""

    @staticmethod
    def forward(ctx, x, slope, inplace):
        # the flags before x may be overwritten; a slope of 0 makes the kernel emit 0/1
        ctx.save_for_backward(_chunked_flags(
            x, lambda one, c: _aten.leaky_relu_backward(one, c, 0.0, False)))
        ctx.slope = slope
        if inplace:
            ctx.mark_dirty(x)
            F.leaky_relu_(x, slope)
            return x  # x itself, for torch.compile (see _Clamp)
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        slope = ctx.slope

        def backward(g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            return _aten.leaky_relu_backward(g, f, slope, False)

        return _chunked_grad(gy, packed, backward), None, None


def clamp_masked(x: torch.Tensor, lo: float, hi: float | None, inplace: bool = False,
                 keep_output: bool = False):
    """``clamp(x, lo, hi)`` (``hi=None``: ReLU) saving a 1-bit mask for backward, or, with
    ``keep_output``, its output (free when the next layer saves that tensor anyway; ReLU6 and
    Hardtanh would otherwise keep their input)."""
    return _Clamp.apply(x, lo, hi, inplace, keep_output)


def leaky_relu_masked(x: torch.Tensor, slope: float, inplace: bool = False):
    """``leaky_relu(x, slope)`` saving a 1-bit mask for backward."""
    return _LeakyReLU.apply(x, slope, inplace)
