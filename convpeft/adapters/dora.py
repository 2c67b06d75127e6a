"""DoRA wrappers: a learned per-output-channel magnitude on top of the LoRA direction.

    W' = m / ||W0 + s dW||_c * (W0 + s dW)

``||.||_c`` is the L2 norm over every dim but the output one, i.e. over a row of the
``(C_out, C_in/g, k_h, k_w)`` weight, which is right for grouped and depthwise convs too (each
output channel only ever sees its own group's inputs). As in DoRA §4.3 the norm is *detached*:
it follows dW in the forward pass but gets no gradient, so gradients reach ``A``, ``B`` and
``m`` only. ``m`` starts at ``||W0||_c``, so the layer equals the base at init. For a conv variant
(:mod:`convpeft.conv_variants`) ``W0`` is the effective weight (e.g. the standardised one), so
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
from torch.autograd.function import once_differentiable

from ..amp import autocast_dtype, cast, no_autocast
from ..flops import pair
from .config import AdapterConfig
from .layer import AdapterLayer
from .lora import LoRAConv2d, LoRALinear

_NORM_EPS = 1e-12

_conv_backward = torch.ops.aten.convolution_backward.default


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    """``||w||_c``: L2 norm of each output row of ``w`` (any dims), shape ``(C_out,)``."""
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


class DoRAConvFunction(torch.autograd.Function):
    """``y = c * (conv(x, W0) + s * conv_B(conv_A(x_lora))) + bias`` with hand-written backward.

    Inputs: ``x`` (N, C_in, H, W) already padded; ``x_lora`` the LoRA branch input (dropout
    applied) or ``None`` when it is ``x``; ``weight`` (C_out, C_in/g, kh, kw); ``bias`` (C_out,)
    or ``None``; ``a_w`` (g r, C_in/g, kh, kw); ``b_w`` (C_out, r, 1, 1); ``c`` (C_out,).
    Returns ``y`` (N, C_out, H_out, W_out). Gradients are computed only for inputs that need them.

    Autocast: casts explicitly (see :mod:`convpeft.amp`): under ``torch.autocast`` on ``x``'s
    device every input is cast to autocast's dtype and ``y`` comes out in it (as the plain conv
    of the weight path would); the gradients come back in each input's own dtype, the ``c`` and
    bias reductions accumulated in fp32.
    """

    # torch.func (grad, vmap, per-sample gradients): forward without ctx plus setup_context;
    # vmap runs forward, setup_context and backward on batched tensors (all plain torch ops)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_lora, weight, bias, a_w, b_w, c, s, stride, padding, dilation, groups):
        """``(y, h, z)``: the output, and the LoRA intermediate and ``z`` backward reads (not
        differentiable)."""
        # Under autocast: every float input in autocast's dtype, the body with autocast off
        # (see convpeft.amp); outside it ``dt`` is None and nothing is cast.
        dt = autocast_dtype(x)
        x, x_lora, weight, bias, a_w, b_w, c = (
            cast(t, dt) for t in (x, x_lora, weight, bias, a_w, b_w, c))
        with no_autocast(x):
            xl = x if x_lora is None else x_lora
            h = F.conv2d(xl, a_w, None, stride, padding, dilation, groups)
            z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
            z.add_(F.conv2d(h, b_w, None, 1, 0, 1, groups), alpha=s)
            cv = c.reshape(1, -1, 1, 1)
            y = torch.addcmul(bias.reshape(1, -1, 1, 1), z, cv) if bias is not None else z * cv
        return y, h, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_lora, weight, bias, a_w, b_w, c, s, stride, padding, dilation, groups = inputs
        _, h, z = output
        ctx.mark_non_differentiable(h, z)
        ctx.set_materialize_grads(False)  # no zeros for h's and z's (never used) gradients
        dt = autocast_dtype(x)  # as in forward (same autocast state): the casts are repeated
        ctx.in_dtypes = [None if t is None else t.dtype
                         for t in (x, x_lora, weight, bias, a_w, b_w, c)]
        # Under autocast x, h and z are saved in the compute dtype (half of fp32's bytes); the
        # base weight is saved as stored (resident anyway) and cast again in backward, where
        # autocast's own conv would keep a low-precision copy of it; the small factors and c
        # are saved cast.
        ctx.save_for_backward(cast(x, dt), cast(x_lora, dt), weight, cast(a_w, dt),
                              cast(b_w, dt), cast(c, dt), h, z)
        ctx.s = s
        ctx.geom = (list(stride), list(padding), list(dilation), groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _gh=None, _gz=None):
        if gy is None:  # y got no gradient (grads are not materialised: see setup_context)
            return (None,) * 12
        # Forward, per output channel o:  z = conv(x, W) + s * conv_B(h),  h = conv_A(x_lora),
        # y = c_o * z + bias_o.  So, with gz = dL/dz = c * gy:
        #   dL/dc_o    = sum_{n,i,j} gy * z          (why z is saved)
        #   dL/dbias_o = sum_{n,i,j} gy
        #   dL/dh, dL/dB = conv_backward of the 1x1 grouped conv_B at gz, times s
        #   dL/dx_lora, dL/dA = conv_backward of conv_A at dL/dh
        #   dL/dx, dL/dW = conv_backward of the base conv at gz
        # and when x_lora is x (no dropout) its two gradients add. convolution_backward takes
        # (grad_out, input, weight, bias_sizes, stride, padding, dilation, transposed,
        # output_padding, groups, output_mask=[grad_input?, grad_weight?, grad_bias?]).
        x, x_lora, weight, a_w, b_w, c, h, z = ctx.saved_tensors
        (need_x, need_xl_in, need_w, need_bias, need_a, need_b, need_c,
         *_) = ctx.needs_input_grad
        stride, padding, dilation, groups = ctx.geom
        s = ctx.s
        gy = gy.to(z.dtype)  # the output's dtype, as a rule; a caller may upcast it
        weight = cast(weight, z.dtype)
        # the per-channel reductions accumulate in fp32 at least (bf16 sums lose digits)
        acc = torch.promote_types(z.dtype, torch.float32)
        g_c = (gy * z).sum((0, 2, 3), dtype=acc) if need_c else None
        g_bias = gy.sum((0, 2, 3), dtype=acc) if need_bias else None
        del z
        gz = gy * c.reshape(1, -1, 1, 1)
        need_xl = need_xl_in if x_lora is not None else need_x
        need_h = need_a or need_xl
        g_h, g_bw, _ = _conv_backward(gz, h, b_w, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                      groups, [need_h, need_b, False])
        g_aw = g_xl = None
        if need_h:
            g_h.mul_(s)
            xl = x if x_lora is None else x_lora
            g_xl, g_aw, _ = _conv_backward(g_h, xl, a_w, None, stride, padding, dilation, False,
                                           [0, 0], groups, [need_xl, need_a, False])
        if g_bw is not None:
            g_bw.mul_(s)
        g_x = g_w = None
        if need_x or need_w:
            g_x, g_w, _ = _conv_backward(gz, x, weight, None, stride, padding, dilation, False,
                                         [0, 0], groups, [need_x, need_w, False])
        if x_lora is None and g_xl is not None:
            g_x = g_xl if g_x is None else g_x.add_(g_xl)
            g_xl = None
        # each gradient in its input's dtype (fp32 parameters get fp32 gradients under autocast)
        grads = [cast(g, dt) for g, dt in zip((g_x, g_xl, g_w, g_bias, g_aw, g_bw, g_c),
                                              ctx.in_dtypes, strict=True)]
        return (*grads, None, None, None, None, None)


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

