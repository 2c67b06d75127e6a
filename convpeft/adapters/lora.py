"""LoRA wrappers for ``nn.Conv2d`` (every geometry) and ``nn.Linear``.

A wrapper keeps the original layer as ``base_layer`` (frozen) and adds two factors, stored as
plain parameters so that no extra conv modules show up in ``model.named_modules()``:

* ``lora_A``: ``(r, C_in/g, k_h, k_w)`` for a conv, ``(r, in)`` for a linear layer;
* ``lora_B``: ``(C_out, r)``, zero-initialised, so the adapted layer equals the base at init.

``alpha=None`` (the default) means ``alpha = r``, i.e. ``s = 1`` (``sqrt(r)`` with rsLoRA's
``s = alpha / sqrt(r)``); peft's default is ``alpha = 8``, so pass ``alpha`` to match it.

The update has the base weight's shape ``(C_out, C_in/g, k_h, k_w)``:

    dW.reshape(C_out, -1) = B @ A.reshape(r, -1),    W = W0 + s * dW,   s = alpha / r

This single factorisation covers every kind, with no divisibility rule between ``r`` and ``g``:

* ``groups == 1`` (standard, pointwise): ordinary LoRA, ``r * (C_out + C_in k_h k_w)`` params,
  identical to peft's (``lora_A`` = peft's ``lora_A.weight``, ``lora_B`` = peft's
  ``lora_B.weight`` viewed as ``(C_out, r)``).
* depthwise (``g = C_in``, ``C_out = m * C_in``): every output channel's ``k_h x k_w`` kernel is
  row ``c`` of the ``(C_out, k_h k_w)`` low-rank matrix ``B @ A``; ``r * (C_out + k_h k_w)``
  params.
* grouped (``1 < g < C_in``): all groups share the ``r`` input-side kernels ``A`` and each output
  channel mixes them with its own row of ``B``; ``r * (C_out + C_in/g k_h k_w)`` params. We chose
  this *shared* factorisation over one LoRA per group (``g`` times as many ``A`` params) because
  it keeps the grouped and depthwise cases one formula and never costs more than per-group LoRA.

The update stays inside the group structure by construction (dW has the base weight's shape), so
merging is always possible. The adapter has ``r * (C_out + K)`` params with
``K = C_in/g * k_h * k_w`` against ``C_out * K`` for the layer itself: it **outgrows the layer
once** ``r > C_out * K / (C_out + K)``, e.g. a 3x3 depthwise layer with 32 channels at ``r >= 8``
(``32*9/41 = 7.0``). Ranks above ``min(C_out, K)`` add parameters but no expressiveness.
:class:`convpeft.AdapterReport` flags such layers.

Two equivalent computations (``mode``), both exact:

* ``"activation"``: ``y = conv(x, W0) + s * conv_B(conv_A(x))`` where ``conv_A`` has the base's
  kernel, stride, padding, dilation, padding mode and groups (``A`` repeated per group,
  ``g * r`` output channels) and ``conv_B`` is a 1x1 conv with ``groups = g``, one autograd
  Function (:class:`~convpeft.ops.adapter_conv.LoRAConvFunction`): ``conv_B``'s output
  accumulates into the base output in place, and the input gradient is one transposed conv
  with the merged weight ``W0 + s dW`` instead of two input-sized gradients and their sum.
  Extra cost per step ~ ``P r (2 g K + 3 C_out)`` MACs with ``A`` trainable (``P = N H_out
  W_out`` output positions; forward both convs, backward ``B``'s and ``A``'s gradients) plus
  ``C_out r K`` to form ``dW``;
  it saves the ``(N, g r, H_out, W_out)`` intermediate, and ``x`` only where ``A`` trains.
* ``"weight"``: ``y = conv(x, W0 + s dW)``: one conv, the ``C_out r K`` MAC product forming dW,
  and the backward pass computes the full weight gradient ``P C_out K`` MACs (which the frozen
  base layer would skip) before projecting it onto ``A`` and ``B``. It saves no extra activation.

``nn.Conv2d`` subclasses whose ``forward`` does more (timm's TF-"SAME" ``Conv2dSame``, the
weight-standardised ``StdConv2d``/``ScaledStdConv2d``) are reproduced through their
:mod:`convpeft.core.conv_variants` entry: ``W0`` above is the *effective* weight the subclass
convolves with and ``x`` is padded the way it pads; unregistered subclasses are refused. A layer
whose effective weight is not its stored weight cannot absorb ``s dW`` in place:
:meth:`AdapterLayer.unload` then returns a plain layer holding ``W0_eff + s dW`` instead.

The choice between the two (``mode="auto"``), merging and unloading are common to every
adapter and live in :class:`~convpeft.adapters.layer.AdapterLayer` (:mod:`convpeft.adapters.layer`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convpeft.core.conv_variants import ConvVariant, conv_variant
from convpeft.core.flops import conv2d_flops, conv2d_output_hw, linear_flops, matmul_flops, pair
from convpeft.ops.adapter_conv import lora_conv2d
from convpeft.ops.conv import chunked_conv2d

from .config import AdapterConfig
from .layer import WEIGHT_SPACE_DEVICES as WEIGHT_SPACE_DEVICES
from .layer import AdapterLayer


def conv_padding(base: nn.Conv2d, *, padding_mode: bool = True,
                 ) -> tuple[list[int] | None, str, tuple[int, int]]:
    """How to reproduce ``base``'s padding with explicit ops: ``(pre_pad, pad_mode, conv_pad)``.

    ``pre_pad`` (``[left, right, top, bottom]`` for ``F.pad``) is ``None`` when the conv can pad
    by itself (zeros, symmetric). Non-zero padding modes and asymmetric ``'same'`` padding (even
    kernels) need an explicit ``F.pad`` first; then the conv gets ``conv_pad = (0, 0)``.
    ``padding_mode=False``: pad with zeros whatever ``base.padding_mode`` says (a conv variant
    whose forward ignores it, :mod:`convpeft.core.conv_variants`). Input-size-dependent padding
    (TF "SAME") is the variant's and comes before this.
    """
    kh, kw = pair(base.kernel_size)
    dh, dw = pair(base.dilation)
    if isinstance(base.padding, str):
        if base.padding == "valid":
            pads = [0, 0, 0, 0]
        else:  # 'same': total d*(k-1), the extra pixel (even kernels) goes right/bottom as torch
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    else:
        ph, pw = pair(base.padding)
        pads = [pw, pw, ph, ph]
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    pmode = base.padding_mode if padding_mode else "zeros"
    if pmode == "zeros" and symmetric:
        return None, "constant", (pads[2], pads[0])
    mode = "constant" if pmode == "zeros" else pmode
    return pads, mode, (0, 0)


class LoRAConv2d(AdapterLayer):
    """LoRA around an ``nn.Conv2d`` of any geometry (see the module docstring)."""

    def __init__(self, base_layer: nn.Conv2d, config: AdapterConfig) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        # the subclass's own computation, or UnsupportedLayerError before anything is changed
        variant = conv_variant(base_layer)
        super().__init__(base_layer, config)
        self.variant: ConvVariant = variant
        self._pre_pad, self._pad_mode, self._conv_pad = conv_padding(
            base_layer, padding_mode=self.variant.padding_mode)

    @property
    def groups(self) -> int:
        return int(self.base_layer.groups)

    def base_weight(self) -> torch.Tensor:
        """The effective weight of the base conv's forward (``(C_out, C_in/g, k_h, k_w)``):
        the stored weight, or e.g. its standardisation for timm's ``StdConv2d``."""
        return self.variant.effective_weight(self.base_layer)

    @property
    def folds_in_place(self) -> bool:
        return self.variant.folds and super().folds_in_place

    def plain_layer(self) -> nn.Module:
        layer = self.variant.plain_layer(self.base_layer, self.merged_weight().detach())
        return self._restore_flags(layer)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """The base conv's padding as explicit ops: the variant's input-size-dependent padding
        (TF "SAME"), then any padding the conv cannot do itself; ``conv_pad`` is the rest."""
        x = self.variant.pad_input(self.base_layer, x)
        if self._pre_pad is None:
            return x
        return F.pad(x, self._pre_pad, mode=self._pad_mode)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The base layer's convolution with weight ``w`` on the already padded ``x``."""
        base = self.base_layer
        return F.conv2d(x, w, b, base.stride, self._conv_pad, base.dilation, base.groups)

    def a_conv_weight(self) -> torch.Tensor:
        """``conv_A``'s weight ``(g r, C_in/g, k_h, k_w)``: ``A`` shared by every group."""
        g = self.groups
        return self.lora_A if g == 1 else self.lora_A.repeat(g, 1, 1, 1)

    def b_conv_weight(self) -> torch.Tensor:
        """``conv_B``'s weight ``(C_out, r, 1, 1)`` (a 1x1 conv with ``groups = g``)."""
        return self.lora_B.reshape(self.out_features, self.rank, 1, 1)

    def lora_branch(self, xp: torch.Tensor) -> torch.Tensor:
        """``conv_B(conv_A(xp))`` for a padded input ``xp`` (unscaled)."""
        h = self._conv(xp, self.a_conv_weight(), None)
        return F.conv2d(h, self.b_conv_weight(), None, 1, 0, 1, self.groups)

    def _lora_input(self, x: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        return xp if isinstance(self.dropout, nn.Identity) else self._pad(self.dropout(x))

    def fa_saves_less(self, x_shape: tuple[int, ...]) -> bool:
        """Whether LoRA-FA in activation space keeps less than the base layer would: it keeps
        ``h = conv_A(x)`` (``g r`` channels at the output size) where that is smaller than ``x``
        (on depthwise/grouped layers ``g r`` often exceeds ``C_in``; then it keeps ``x`` and
        recomputes ``h``, as the weight space would keep ``x``). The auto mode prefers the
        activation space for LoRA-FA where this holds."""
        n, (ho, wo) = self._geometry(x_shape)
        return self.groups * self.rank * ho * wo < x_shape[-3] * x_shape[-2] * x_shape[-1]

    def _forward_activation(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        xp = self._pad(x)
        if isinstance(self.dropout, nn.Identity):
            # one Function: one input gradient through W0 + s dW, conv_B accumulated into y,
            # x saved only where A trains (LoRA-FA keeps h = conv_A(x) alone)
            return lora_conv2d(xp, self.base_weight(), base.bias, self.a_conv_weight(),
                               self.lora_B, self.scaling, base.stride, self._conv_pad,
                               base.dilation, base.groups)
        y = self._conv(xp, self.base_weight(), base.bias)
        # In place: the frozen conv's backward does not need its output, so this saves a copy.
        return y.add_(self.lora_branch(self._lora_input(x, xp)), alpha=self.scaling)

    def _forward_weight(self, x: torch.Tensor) -> torch.Tensor:
        # a large conv's backward in batch chunks: its oneDNN scratch scales with the chunk
        base = self.base_layer
        return chunked_conv2d(self._pad(x), self.merged_weight(), base.bias, base.stride,
                              self._conv_pad, base.dilation, base.groups)

    def _geometry(self, x_shape: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        n = x_shape[0] if len(x_shape) == 4 else 1
        base = self.base_layer
        h, w = x_shape[-2:]
        dyn = self.variant.input_pads(self.base_layer, (h, w))
        if dyn is not None:
            h += dyn[2] + dyn[3]
            w += dyn[0] + dyn[1]
        if self._pre_pad is not None:
            h += self._pre_pad[2] + self._pre_pad[3]
            w += self._pre_pad[0] + self._pre_pad[1]
        hw = conv2d_output_hw((h, w), base.kernel_size, stride=base.stride,
                              padding=self._conv_pad, dilation=base.dilation)
        return n, hw

    def _mode_costs(self, x_shape: tuple[int, ...], input_grad: bool) -> dict[str, tuple[int, int]]:
        base = self.base_layer
        n, hw = self._geometry(x_shape)
        g, r = self.groups, self.rank
        fa = conv2d_flops(batch=n, in_channels=base.in_channels, out_channels=g * r,
                          kernel_size=base.kernel_size, out_hw=hw, groups=g, input_grad=input_grad)
        fb = conv2d_flops(batch=n, in_channels=g * r, out_channels=base.out_channels,
                          kernel_size=1, out_hw=hw, groups=g)
        full = conv2d_flops(batch=n, in_channels=base.in_channels, out_channels=base.out_channels,
                            kernel_size=base.kernel_size, out_hw=hw, groups=g)
        prod = matmul_flops(self.out_features, r, self.fan_in)
        # activation space backward (LoRAConvFunction): B's gradient; A's gradient and the
        # h gradient it reads where A trains; the input gradient is the base layer's own with
        # the merged weight, plus forming dW (prod)
        a_trains = not self.freeze_a
        backward = (fb.backward_weight + (fb.backward_input + fa.backward_weight if a_trains else 0)
                    + (prod if input_grad else 0))
        return {
            "activation": (fa.forward + fb.forward, backward),
            "weight": (prod, full.backward_weight + 2 * prod),
        }


class LoRALinear(AdapterLayer):
    """LoRA around an ``nn.Linear``: ``y = x W0^T + b + s * (x A^T) B^T``."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, config)

    def plain_layer(self) -> nn.Module:
        w = self.merged_weight().detach()
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, base.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if base.bias is not None:
                out.bias.copy_(base.bias.detach())
        return self._restore_flags(out)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def _forward_activation(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        y = F.linear(x, base.weight, base.bias)
        return y.add_(self.lora_branch(self.dropout(x)), alpha=self.scaling)

    def _forward_weight(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.base_layer.bias)

    def _mode_costs(self, x_shape: tuple[int, ...], input_grad: bool) -> dict[str, tuple[int, int]]:
        fin, fout, r = self.base_layer.in_features, self.out_features, self.rank
        tokens = math.prod(x_shape[:-1]) if len(x_shape) > 1 else 1
        fa = linear_flops(tokens=tokens, in_features=fin, out_features=r)
        fb = linear_flops(tokens=tokens, in_features=r, out_features=fout)
        prod = matmul_flops(fout, r, fin)
        full = linear_flops(tokens=tokens, in_features=fin, out_features=fout)
        return {
            "activation": (fa + fb, fa * (2 if input_grad else 1) + 2 * fb),
            "weight": (prod, full + 2 * prod),
        }
