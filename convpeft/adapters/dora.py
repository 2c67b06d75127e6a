"""DoRA wrappers: a learned per-output-channel magnitude on top of the LoRA direction.

    W' = m / ||W0 + s dW||_c * (W0 + s dW)

``||.||_c`` is the L2 norm over every dim but the output one, i.e. over a row of the
``(C_out, C_in/g, k_h, k_w)`` weight, which is right for grouped and depthwise convs too (each
output channel only ever sees its own group's inputs). As in DoRA §4.3 the norm is *detached*:
it follows dW in the forward pass but gets no gradient, so gradients reach ``A``, ``B`` and
``m`` only. ``m`` starts at ``||W0||_c``, so the layer equals the base at init. For a conv variant
(:mod:`convpeft.core.conv_variants`) ``W0`` is the effective weight (e.g. the standardised one), so
the norm is that of the weight the layer really convolves with.

Two exact computations, chosen like LoRA's (see :mod:`convpeft.adapters.lora`):

* weight space: ``y = conv(x, W')``: one conv, nothing saved beyond the input that the conv
  saves anyway; its backward computes the weight gradient of the full layer.
* activation space: ``z = conv(x, W0) + s conv_B(conv_A(x))``, ``y = c * z + b`` with
  ``c = m / ||W0 + s dW||_c``. A custom autograd Function (:class:`DoRAConvFunction`) runs the
  base conv once, adds the LoRA branch into its output in place and saves only ``x`` (shared with
  the layer before), the ``(N, g r, H, W)`` LoRA intermediate and ``z``, which ``m``'s gradient
  ``sum(grad_y * z) / ||.||`` needs. peft keeps the base output, the LoRA output and their scaled
  copies instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convpeft.core.flops import pair
from convpeft.ops.adapter_conv import DoRAConvFunction

from .config import AdapterConfig
from .layer import AdapterLayer
from .lora import LoRAConv2d, LoRALinear

_NORM_EPS = 1e-12

def _row_norm(w: torch.Tensor) -> torch.Tensor:
    """``||w||_c``: L2 norm of each output row of ``w`` (any dims), shape ``(C_out,)``."""
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


class _DoRAMixin:
    """Magnitude parameter, merged weight and the shared bits of DoRA conv/linear."""

    method = "dora"

    def _init_magnitude(self) -> None:
        with torch.no_grad():
            w = self.base_weight()  # the effective weight (weight-standardised convs)
            self.magnitude = nn.Parameter(_row_norm(w.detach()).to(w.dtype))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.magnitude]

    def channel_scale(self, direction: torch.Tensor | None = None) -> torch.Tensor:
        """``c = m / ||W0 + s dW||_c`` (C_out,), the norm detached (DoRA §4.3)."""
        if direction is None:
            with torch.no_grad():
                direction = AdapterLayer.merged_weight(self)
        norm = _row_norm(direction.detach()).clamp_min(_NORM_EPS)
        return self.magnitude / norm

    def merged_weight(self) -> torch.Tensor:
        """``W' = c * (W0 + s dW)``, the weight of the equivalent plain layer."""
        direction = AdapterLayer.merged_weight(self)
        c = self.channel_scale(direction)
        return direction * c.reshape(-1, *([1] * (direction.dim() - 1)))


class DoRAConv2d(_DoRAMixin, LoRAConv2d):
    """DoRA around an ``nn.Conv2d`` of any geometry (groups included)."""

    def __init__(self, base_layer: nn.Conv2d, config: AdapterConfig) -> None:
        super().__init__(base_layer, config)
        self._init_magnitude()

    def _saved_elements(self, x_shape: tuple[int, ...]) -> dict[str, int]:
        """Beyond ``x``: activation space keeps ``h`` (N, g r, H_out, W_out) and ``z``
        (N, C_out, H_out, W_out); weight space the direction and ``W'`` (C_out, K) each."""
        n, (ho, wo) = self._geometry(x_shape)
        return {"activation": n * ho * wo * (self.groups * self.rank + self.out_features),
                "weight": 2 * self.out_features * self.fan_in}

    def _forward_activation(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched input
            return self._forward_activation(x.unsqueeze(0)).squeeze(0)
        base = self.base_layer
        xp = self._pad(x)
        x_lora = None if isinstance(self.dropout, nn.Identity) else self._pad(self.dropout(x))
        c = self.channel_scale()
        w0 = self.base_weight()
        args = (xp, x_lora, w0, base.bias, self.a_conv_weight(), self.b_conv_weight(), c,
                self.scaling, pair(base.stride), self._conv_pad, pair(base.dilation),
                self.groups)
        if not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in args[:7])):
            # nothing to differentiate (evaluation, an exported graph): the same ops, run
            # plainly (a tracer then sees the convs, not a Function with extra outputs)
            return DoRAConvFunction.forward(*args)[0]
        return DoRAConvFunction.apply(*args)[0]


class DoRALinear(_DoRAMixin, LoRALinear):
    """DoRA around an ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig) -> None:
        super().__init__(base_layer, config)
        self._init_magnitude()

    def _saved_elements(self, x_shape: tuple[int, ...]) -> dict[str, int]:
        """Beyond ``x``: activation space keeps ``x A^T`` (tokens, r) and ``z`` (tokens, out);
        weight space the direction and ``W'`` (out, in) each."""
        tokens = math.prod(x_shape[:-1]) if len(x_shape) > 1 else 1
        return {"activation": tokens * (self.rank + self.out_features),
                "weight": 2 * self.out_features * self.fan_in}

    def _forward_activation(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        c = self.channel_scale()
        z = F.linear(x, base.weight)
        # In place on the frozen product (its backward needs no output); z is saved once, for m.
        z = z.add_(self.lora_branch(self.dropout(x)), alpha=self.scaling)
        # under autocast z is in autocast's dtype: keep y in it too (as the weight path's
        # F.linear gives), rather than promoting it to c's fp32
        y = z * c.to(z.dtype)
        return y if base.bias is None else y.add_(base.bias)

