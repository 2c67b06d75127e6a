"""The adapters' conv kernels: LoRA's and DoRA's activation-space convs, each one autograd
Function with a hand-written backward (:class:`LoRAConvFunction`, :class:`DoRAConvFunction`).

Why hand-written: autograd would keep two input-sized gradients (the base conv's and the
adapter branch's) and an output-sized copy of the branch, and save ``x`` even where no gradient
reads it; these save only what their gradients read and add in place (each class says how).
Both follow torch.func's protocol (``forward`` without ``ctx``, ``setup_context``, a generated
vmap rule), so ``torch.func.grad``/``vmap`` give per-sample gradients, and both cast explicitly
under autocast (:mod:`convpeft.core.amp`). The layers that call them are
:mod:`convpeft.adapters.lora` and :mod:`convpeft.adapters.dora`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from convpeft.core.amp import autocast_dtype, cast, no_autocast

from .conv import conv2d_input_chunked

__all__ = ["DoRAConvFunction", "LoRAConvFunction", "accumulate_b_", "lora_conv2d"]

_conv_backward = torch.ops.aten.convolution_backward.default


def _is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor (``torch.func.vmap``; in-place ``baddbmm_`` has no
    batching rule there and would fall back to a slow per-sample loop, with a warning)."""
    return torch._C._functorch.is_batchedtensor(t)


def accumulate_b_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: float,
                  groups: int) -> torch.Tensor:
    """``y += s * conv_B(h)`` in place, no autograd: ``y (N, C_out, H, W)``, ``h (N, g r, H, W)``,
    ``b (C_out, r)``, ``conv_B`` the 1x1 conv with ``groups = g``.

    Ungrouped and contiguous, a 1x1 conv is a batched matmul over channels,
    ``y[n] (C_out, HW) += s * B @ h[n] (r, HW)``, and ``baddbmm_`` accumulates straight into
    ``y``: ``y.add_(conv_B(h))`` would first materialise a second output-sized tensor (on CPU
    plus oneDNN's blocked twin of it). On a large early layer that is the update's peak
    (ResNet18's stem at batch 64 x 224x224: ``y``, ``conv_B(h)`` and the twin, 3 x 196 MiB)."""
    if groups == 1 and y.dim() == 4 and y.is_contiguous() and not _is_batched(y):
        n, c = y.shape[:2]
        r = h.shape[1]
        y.view(n, c, -1).baddbmm_(b.expand(n, c, r), h.reshape(n, r, -1), alpha=s)
        return y
    return y.add_(F.conv2d(h, b.reshape(*b.shape, 1, 1), None, 1, 0, 1, groups), alpha=s)


class LoRAConvFunction(torch.autograd.Function):
    """``y = conv(x, W0) + bias + s * conv_B(conv_A(x))`` with a hand-written backward (activation
    space, frozen ``W0``; ``x`` already padded).

    Inputs: ``x (N, C_in, H, W)``, ``weight`` W0 ``(C_out, C_in/g, kh, kw)``, ``bias (C_out,)`` or
    ``None``, ``a_w`` = ``conv_A``'s weight ``(g r, C_in/g, kh, kw)`` (``A`` repeated per group),
    ``b (C_out, r)``. Returns ``y (N, C_out, H_out, W_out)``.

    What autograd would do, and why this does less:

    * it would add two input gradients, ``conv_input(gy, W0) + conv_input(gh, A)``, each the
      size of ``x`` and both live at once (plus the sum, plus each conv's scratch). They are one
      transposed conv with the merged weight: ``gx = conv_input(gy, W0 + s dW)`` (``dW`` from
      ``B @ A``, weight-sized): one input-sized tensor, and ``conv_A``'s input-gradient FLOPs
      become the ``C_out r K`` MACs of forming ``dW``;
    * ``conv_B``'s output is accumulated into ``y`` (:func:`accumulate_b_`), not added from a copy;
    * only what the gradients read is saved: ``h = conv_A(x)`` for ``B`` and ``x`` only where
      ``A`` (or the base weight) trains. With ``A`` frozen (LoRA-FA) that is ``h`` alone, ``g r``
      channels instead of ``C_in``: LoRA-FA's saving with no separate lean path.

    Autocast (:mod:`convpeft.core.amp`): inputs are cast to autocast's dtype, ``y`` comes out in it,
    gradients in each input's own dtype; the stored weight is saved (resident anyway).
    """

    # torch.func (grad, vmap, per-sample gradients): forward without ctx plus setup_context;
    # vmap runs forward, setup_context and backward on batched tensors (all plain torch ops)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, a_w, b, s, stride, padding, dilation, groups):
        """``(y, h)``: the output and ``h = conv_A(x)`` (for backward; not differentiable)."""
        dt = autocast_dtype(x)
        xc, wc, bc, ac, bcast = (cast(t, dt) for t in (x, weight, bias, a_w, b))
        with no_autocast(x):
            h = F.conv2d(xc, ac, None, stride, padding, dilation, groups)
            y = F.conv2d(xc, wc, bc, stride, padding, dilation, groups)
            accumulate_b_(y, h, bcast, s, groups)
        return y, h

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, a_w, b, s, stride, padding, dilation, groups = inputs
        y, h = output
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)  # no zeros for h's (never used) gradient
        dt = autocast_dtype(x)  # as in forward (same autocast state): the casts are repeated
        ctx.in_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype,
                         a_w.dtype, b.dtype)
        need_w, need_a = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        # B's gradient reads h; with A frozen (LoRA-FA) keep the smaller of h and x (h is
        # recomputed from x in backward where x is smaller: depthwise/grouped, g r > C_in)
        recompute_h = not need_a and x.numel() < h.numel()
        keep_x = need_a or need_w or recompute_h
        ctx.save_for_backward(cast(x, dt) if keep_x else None, weight, cast(a_w, dt),
                              cast(b, dt), None if recompute_h else h)
        ctx.x_shape = x.shape
        ctx.s = s
        ctx.geom = (list(stride), list(padding), list(dilation), groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _gh=None):
        if gy is None:  # y got no gradient (grads are not materialised: see setup_context)
            return (None,) * 10
        x, weight, a_w, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        stride, padding, dilation, groups = ctx.geom
        s = ctx.s
        gy = gy.to(b.dtype)  # the compute dtype (b was saved cast)
        n, c = gy.shape[:2]
        r = b.shape[1]
        gh = gb = ga = gx = gw = gbias = None
        # the input gradient through the merged weight needs a weight-sized temporary: worth it
        # where the weight is smaller than the input (activations dominate), else the two
        # input gradients are summed in place
        merge = need_x and weight.numel() <= math.prod(ctx.x_shape)
        need_gh = need_a or (need_x and not merge)
        if h is None and (need_gh or need_b):
            with no_autocast(gy):
                h = F.conv2d(x, a_w, None, stride, padding, dilation, groups)
        if need_gh or need_b:  # conv_B's backward: gh = s B^T gy, gB = s sum_n gy h^T
            if groups == 1:
                g3 = gy.reshape(n, c, -1)
                if need_gh:
                    gh = torch.bmm(b.t().expand(n, r, c), g3).view(h.shape).mul_(s)
                if need_b:
                    gb = torch.bmm(g3, h.reshape(n, r, -1).transpose(1, 2)).sum(0).mul_(s)
            else:
                gh, gb4, _ = _conv_backward(gy, h, b.reshape(c, r, 1, 1), None, [1, 1], [0, 0],
                                            [1, 1], False, [0, 0], groups,
                                            [need_gh, need_b, False])
                gh = gh.mul_(s) if gh is not None else None
                gb = gb4.reshape(c, r).mul_(s) if gb4 is not None else None
        if need_a:
            ga = _conv_backward(gh, x, a_w, None, stride, padding, dilation, False, [0, 0],
                                groups, [False, True, False])[1]
        del h
        if merge:  # one transposed conv with W0 + s dW instead of two input gradients
            w = cast(weight, gy.dtype)
            a = a_w[: r].reshape(r, -1).to(w.dtype)
            merged = torch.addmm(w.reshape(c, -1), b.to(w.dtype), a, alpha=s).view(w.shape)
            gx = conv2d_input_chunked(ctx.x_shape, merged, gy, stride, padding, dilation,
                                      groups)
        elif need_x:
            gx = conv2d_input_chunked(ctx.x_shape, cast(weight, gy.dtype), gy, stride, padding,
                                      dilation, groups)
            gx.add_(conv2d_input_chunked(ctx.x_shape, a_w, gh, stride, padding, dilation,
                                         groups))
        del gh
        if need_w:
            gw = _conv_backward(gy, x, cast(weight, gy.dtype), None, stride, padding, dilation,
                                False, [0, 0], groups, [False, True, False])[1]
        if need_bias:
            gbias = gy.sum((0, 2, 3), dtype=torch.promote_types(gy.dtype, torch.float32))
        grads = [cast(g, dt) for g, dt in zip((gx, gw, gbias, ga, gb), ctx.in_dtypes,
                                              strict=True)]
        return (*grads, None, None, None, None, None)


def lora_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a_w: torch.Tensor, b: torch.Tensor, s: float, stride, padding, dilation,
                groups: int) -> torch.Tensor:
    """The activation-space LoRA conv (see :class:`LoRAConvFunction`); without anything to
    differentiate, the same computation with nothing saved."""
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, a_w, b)):
        return LoRAConvFunction.apply(x, weight, bias, a_w, b, s, stride, padding, dilation,
                                      groups)[0]
    h = F.conv2d(x, a_w, None, stride, padding, dilation, groups)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # an exported graph keeps conv_B a Conv (what runtimes fuse), not an in-place MatMul
        return y + s * F.conv2d(h, b.to(y.dtype).reshape(*b.shape, 1, 1), None, 1, 0, 1, groups)
    return accumulate_b_(y, h, b.to(y.dtype), s, groups)


class DoRAConvFunction(torch.autograd.Function):
    """``y = c * (conv(x, W0) + s * conv_B(conv_A(x_lora))) + bias`` with hand-written backward.

    Inputs: ``x`` (N, C_in, H, W) already padded; ``x_lora`` the LoRA branch input (dropout
    applied) or ``None`` when it is ``x``; ``weight`` (C_out, C_in/g, kh, kw); ``bias`` (C_out,)
    or ``None``; ``a_w`` (g r, C_in/g, kh, kw); ``b_w`` (C_out, r, 1, 1); ``c`` (C_out,).
    Returns ``y`` (N, C_out, H_out, W_out). Gradients are computed only for inputs that need them.

    Autocast: casts explicitly (see :mod:`convpeft.core.amp`): under ``torch.autocast`` on ``x``'s
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
        # (see convpeft.core.amp); outside it ``dt`` is None and nothing is cast.
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
