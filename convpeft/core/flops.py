"""The one FLOP convention of convpeft, and the analytic formulas built on it.

Convention (used by every module of the toolkit): **one multiply-accumulate (MAC) = 2 FLOPs**,
for conv, linear and matmul alike (as in Kaplan et al. 2020 and nanoGPT's ``estimate_mfu``,
where a forward pass of a matmul ``(m, k) @ (k, n)`` costs ``2 * m * k * n``). Elementwise work
(batch norm, activations, bias adds, optimizer arithmetic) is *not* folded into these figures;
the profiler reports it in a separate, documented number.

Convolution formulas, for an input ``x: (N, C_in, H, W)``, weight ``W: (C_out, C_in/g, k_h, k_w)``
and output ``y: (N, C_out, H_out, W_out)`` with ``g`` groups. Each output element is a dot product
of length ``(C_in/g) * k_h * k_w``, so

    forward      MACs = N * C_out * H_out * W_out * (C_in / g) * k_h * k_w
    grad input   MACs = the same  (a transposed conv of grad_y with W)
    grad weight  MACs = the same  (each weight entry sums over N * H_out * W_out positions)

A depthwise conv (``g = C_in``) therefore costs ``C_in`` times less than a dense conv of the same
shape in *all three* passes. torch's ``FlopCounterMode`` (torch <= 2.14) gets the weight gradient
of grouped convs wrong by treating it as dense; :func:`conv2d_flops` is the reference we test
against instead.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOPS_PER_MAC = 2
"""FLOPs counted for one multiply-accumulate. Stated once; every formula here uses it."""


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    """``(v, v)`` for an int, else the first two entries as ints (conv kernel/stride/...)."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_output_hw(
    hw: tuple[int, int],
    kernel_size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> tuple[int, int]:
    """Spatial output size ``(H_out, W_out)`` of a Conv2d, following ``torch.nn.Conv2d``'s docs."""
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    h, w = hw
    if padding == "same":
        return h, w
    if padding == "valid":
        ph = pw = 0
    else:
        ph, pw = pair(padding)  # type: ignore[arg-type]
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return ho, wo


@dataclass(frozen=True)
class ConvFlops:
    """FLOPs of one Conv2d call, split by pass (2 FLOPs per MAC)."""

    forward: int
    backward_input: int
    backward_weight: int

    @property
    def backward(self) -> int:
        return self.backward_input + self.backward_weight

    @property
    def total(self) -> int:
        return self.forward + self.backward


def conv2d_macs(
    *,
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    out_hw: tuple[int, int],
    groups: int = 1,
) -> int:
    """Multiply-accumulates of one Conv2d forward pass (see the module docstring)."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )
    kh, kw = pair(kernel_size)
    ho, wo = out_hw
    return batch * out_channels * ho * wo * (in_channels // groups) * kh * kw


def conv2d_flops(
    *,
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    out_hw: tuple[int, int],
    groups: int = 1,
    input_grad: bool = True,
    weight_grad: bool = True,
) -> ConvFlops:
    """FLOPs of a Conv2d's forward and of the two backward products autograd may compute.

    ``input_grad``/``weight_grad`` say whether autograd computes that gradient: the input gradient
    is skipped when nothing before the layer needs a gradient (e.g. the first layer, or a frozen
    prefix), the weight gradient when the weight is frozen.
    """
    f = FLOPS_PER_MAC * conv2d_macs(
        batch=batch,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        out_hw=out_hw,
        groups=groups,
    )
    return ConvFlops(forward=f, backward_input=f if input_grad else 0,
                     backward_weight=f if weight_grad else 0)


def linear_flops(*, tokens: int, in_features: int, out_features: int) -> int:
    """Forward FLOPs of ``y = x @ W.T`` for ``tokens`` rows: ``2 * tokens * in * out``.

    The input and weight gradients each cost the same again.
    """
    return FLOPS_PER_MAC * tokens * in_features * out_features


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of ``(m, k) @ (k, n)``: ``2 * m * k * n``."""
    return FLOPS_PER_MAC * m * k * n


def svd_flops(m: int, n: int) -> int:
    """FLOPs of a thin SVD ``A = U S V^T`` of an ``m x n`` matrix, U and V included.

    Uses the R-SVD operation count of Golub & Van Loan, *Matrix Computations* (4th ed.,
    Fig. 8.6.1): ``6 m n^2 + 20 n^3`` for ``m >= n`` (transposed otherwise). Their count already
    treats a multiply and an add as one FLOP each, which matches our 2-FLOPs-per-MAC convention.
    This is what GaLore pays on every projection refresh.
    """
    if m < n:
        m, n = n, m
    return 6 * m * n * n + 20 * n**3
