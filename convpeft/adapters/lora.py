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
  ``g * r`` output channels) and ``conv_B`` is a 1x1 conv with ``groups = g``. Extra cost per
  step ~ ``3 P r (g K + C_out)`` MACs for ``P = N H_out W_out`` output positions; it saves the
  ``(N, g r, H_out, W_out)`` intermediate for the backward pass.
* ``"weight"``: ``y = conv(x, W0 + s dW)``: one conv, the ``C_out r K`` MAC product forming dW,
  and the backward pass computes the full weight gradient ``P C_out K`` MACs (which the frozen
  base layer would skip) before projecting it onto ``A`` and ``B``. It saves no extra activation.

``nn.Conv2d`` subclasses whose ``forward`` does more (timm's TF-"SAME" ``Conv2dSame``, the
weight-standardised ``StdConv2d``/``ScaledStdConv2d``) are reproduced through their
:mod:`convpeft.conv_variants` entry: ``W0`` above is the *effective* weight the subclass
convolves with and ``x`` is padded the way it pads; unregistered subclasses are refused. A layer
whose effective weight is not its stored weight cannot absorb ``s dW`` in place:
:meth:`AdapterLayer.unload` then returns a plain layer holding ``W0_eff + s dW`` instead.

Activation space wins for dense convs on large feature maps, weight space for depthwise and thin
layers (its extra cost does not grow with ``g * r``). ``"auto"`` decides per layer, per input
shape and device (the reason is kept in ``last_reason`` and shown by the adapter report):

* on CUDA (:data:`WEIGHT_SPACE_DEVICES`): weight space. The GPU cost model comes from published
  H100 figures, not from a measurement here: weight space within 1.06-1.20x of full fine-tuning,
  activation space 1.3-5x slower on depthwise-heavy nets;
* elsewhere (CPU): both are evaluated with :mod:`convpeft.flops` (forward + backward while
  training, forward only under ``no_grad``) and the cheaper is taken; ties go to weight space
  (fewer saved activations). DoRA never takes activation space where it would save more for
  backward than weight space (reason ``"memory"``): its activation path keeps ``z`` and the
  LoRA intermediate, its weight path two weight-sized tensors.

Dropout on the adapter input only exists in activation space, so a training layer with
``dropout > 0`` always uses it (reason ``"dropout"``), as does LoRA-FA's lean path where it
saves less (``"lora-fa"``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..conv_variants import ConvVariant, conv_variant
from ..flops import conv2d_flops, conv2d_output_hw, linear_flops, matmul_flops, pair
from ..layer_kinds import layer_kind
from ..lean import frozen_conv2d
from .config import AdapterConfig

_NORM_EPS = 1e-12

WEIGHT_SPACE_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types on which ``mode="auto"`` takes weight space regardless of FLOPs. The cost model
is taken from published figures, not measured here (no GPU was available when it was written):
on an H100, weight space ran within 1.06-1.20x of full fine-tuning's step time, activation space
1.3-5x slower on depthwise-heavy nets (two extra thin convs per layer are launch- and
memory-bound on a GPU, where FLOPs do not predict time)."""


def conv_padding(base: nn.Conv2d, *, padding_mode: bool = True,
                 ) -> tuple[list[int] | None, str, tuple[int, int]]:
    """How to reproduce ``base``'s padding with explicit ops: ``(pre_pad, pad_mode, conv_pad)``.

    ``pre_pad`` (``[left, right, top, bottom]`` for ``F.pad``) is ``None`` when the conv can pad
    by itself (zeros, symmetric). Non-zero padding modes and asymmetric ``'same'`` padding (even
    kernels) need an explicit ``F.pad`` first; then the conv gets ``conv_pad = (0, 0)``.
    ``padding_mode=False``: pad with zeros whatever ``base.padding_mode`` says (a conv variant
    whose forward ignores it, :mod:`convpeft.conv_variants`). Input-size-dependent padding
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


class AdapterLayer(nn.Module):
    """Common part of every adapter wrapper (LoRA and DoRA, conv and linear).

    Subclasses implement ``_forward_activation``, ``_forward_weight``, ``_mode_costs`` and
    ``merged_weight``.
    """

    method = "lora"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        """Wrap ``base_layer`` (frozen here) with the adapter ``config`` describes (already
        validated: a config is checked when it is built; its ``rank`` is this layer's)."""
        super().__init__()
        self.kind = layer_kind(base_layer)
        if self.kind is None:
            raise TypeError(
                f"cannot wrap {type(base_layer).__name__}: adapters support nn.Conv2d and nn.Linear"
            )
        self.config = config
        self.base_layer = base_layer
        # Remember the base's trainability so that merging can give it back unchanged.
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        w = base_layer.weight
        like = {"dtype": w.dtype, "device": w.device}
        rank = config.rank
        self.lora_A = nn.Parameter(torch.empty((rank, *w.shape[1:]), **like))
        self.lora_B = nn.Parameter(torch.zeros((w.shape[0], rank), **like))
        # Same distribution as nn.Linear/Conv2d's default init (uniform, bound 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(w[0].numel())
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
        # LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): A stays at its random init, only B
        # trains, so B's gradient needs only the projection A x, not x (see _forward_activation).
        self.lora_A.requires_grad_(not config.freeze_a)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self._mode_cache: dict[tuple, tuple[str, str]] = {}
        self.last_mode: str | None = None
        self.last_reason: str | None = None  # why last_mode: see resolve_mode

    # -- settings (read from the layer's config) ------------------------------------------------
    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def alpha(self) -> float:
        """``alpha`` as a number (``None`` in the config means ``alpha = rank``)."""
        a = self.config.alpha
        return float(self.config.rank if a is None else a)

    @property
    def rslora(self) -> bool:
        return self.config.rslora

    @property
    def dropout_p(self) -> float:
        return float(self.config.dropout)

    @property
    def freeze_a(self) -> bool:
        return self.config.freeze_a

    @property
    def mode(self) -> str:
        return self.config.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        # a new config (validated on construction), so the saved file says what runs
        self.config = replace(self.config, mode=mode)
        self._mode_cache.clear()

    # -- shapes --------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(self.base_layer.weight.shape[0])

    @property
    def fan_in(self) -> int:
        """``K``: length of one output channel's weight row (``C_in/g * k_h * k_w`` or ``in``)."""
        return int(self.base_layer.weight[0].numel())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter tensor (saved and loaded), trained or not."""
        return [self.lora_A, self.lora_B]

    def fa_saves_less(self, x_shape: tuple[int, ...]) -> bool:
        """Would LoRA-FA's lean path (save ``A x``, not ``x``) save less? Only LoRA convs have
        that path (:class:`LoRAConv2d`)."""
        return False

    def trainable_adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter tensors that train: all of them, or all but ``A`` with ``freeze_a``."""
        return [p for p in self.adapter_parameters() if not (self.freeze_a and p is self.lora_A)]

    def num_adapter_params(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def base_weight(self) -> torch.Tensor:
        """The weight the base layer's forward really uses (``W0``; for a conv variant such as a
        weight-standardised conv, its effective weight, :mod:`convpeft.conv_variants`)."""
        return self.base_layer.weight

    @property
    def folds_in_place(self) -> bool:
        """Can :meth:`merge` write ``W0 + s dW`` back into ``base_layer.weight``? Not when the
        layer transforms its stored weight (weight standardisation, a parametrisation):
        :meth:`unload` then returns a plain layer instead (:meth:`plain_layer`)."""
        return not parametrize.is_parametrized(self.base_layer, "weight")

    def plain_layer(self) -> nn.Module:
        """A new plain layer computing what this adapted layer computes (weight
        :meth:`merged_weight`, detached), trainability as before wrapping."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``dW = (B @ A.flatten(1))`` reshaped to the base weight's shape (differentiable)."""
        w0 = self.base_layer.weight
        return (self.lora_B @ self.lora_A.reshape(self.rank, -1)).reshape(w0.shape)

    def merged_weight(self) -> torch.Tensor:
        """The weight of the equivalent plain layer: ``W0 + s * dW`` (:meth:`base_weight` W0)."""
        return torch.add(self.base_weight(), self.delta_weight(), alpha=self.scaling)

    # -- mode choice ---------------------------------------------------------------------------
    def _mode_costs(self, x_shape: tuple[int, ...], input_grad: bool) -> dict[str, tuple[int, int]]:
        """``{mode: (forward FLOPs, backward FLOPs)}`` the adapter adds to the frozen layer."""
        raise NotImplementedError

    def _saved_elements(self, x_shape: tuple[int, ...]) -> dict[str, int] | None:
        """``{mode: elements saved for backward beyond the shared input}``, for a layer whose
        auto choice must never cost more memory than weight space (DoRA); ``None``: no guard."""
        return None

    def resolve_mode(
        self, x_shape: tuple[int, ...], *, training: bool | None = None, input_grad: bool = True,
        device: str | None = None,
    ) -> str:
        """The computation used for an input of shape ``x_shape`` on ``device`` (a device type,
        default: the base weight's); see the module docstring. A forward keeps it in
        ``last_mode``, its reason in ``last_reason`` (both in the adapter report).

        ``training`` (default: grad mode on and adapter params trainable) decides whether the
        backward pass counts.
        """
        return self._resolve(x_shape, training, input_grad, device)[0]

    def _resolve(self, x_shape: tuple[int, ...], training: bool | None, input_grad: bool,
                 device: str | None) -> tuple[str, str]:
        """``(mode, reason)``; reason: fixed | dropout | lora-fa | cuda | flops | memory."""
        if self.mode != "auto":
            return self.mode, "fixed"
        if training is None:
            training = torch.is_grad_enabled() and self.lora_B.requires_grad
        if training and self.dropout_p > 0 and self.training:
            return "activation", "dropout"
        if training and self.freeze_a and self.fa_saves_less(tuple(x_shape)):
            return "activation", "lora-fa"  # LoRA-FA's lean path; weight space would keep x
        device = device or self.base_layer.weight.device.type
        key = (tuple(x_shape), bool(training), bool(input_grad), device)
        hit = self._mode_cache.get(key)
        if hit is not None:
            return hit
        if device in WEIGHT_SPACE_DEVICES:
            hit = ("weight", device)
        else:
            costs = self._mode_costs(tuple(x_shape), input_grad)
            total = {m: f + (b if training else 0) for m, (f, b) in costs.items()}
            hit = ("activation" if total["activation"] < total["weight"] else "weight", "flops")
            saved = self._saved_elements(tuple(x_shape)) if training else None
            if hit[0] == "activation" and saved and saved["activation"] > saved["weight"]:
                hit = ("weight", "memory")
        self._mode_cache[key] = hit
        return hit

    def adapter_flops(self, x_shape: tuple[int, ...], mode: str | None = None) -> int:
        """Forward FLOPs of the adapter branch for input ``x_shape`` (2 FLOPs per MAC).

        Activation space: ``conv_A + conv_B`` (or the two linears). Weight space: forming
        ``B @ A`` (the conv with the merged weight replaces the base conv and costs the same).
        Elementwise work (adds, DoRA's per-channel scaling and norm) is not counted.
        """
        mode = mode or self.resolve_mode(x_shape, training=self.training)
        return self._mode_costs(tuple(x_shape), True)[mode][0]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        mode, self.last_reason = self._resolve(tuple(x.shape), None, x.requires_grad,
                                               x.device.type)
        self.last_mode = mode
        if mode == "weight":
            return self._forward_weight(x)
        return self._forward_activation(x)

    def _forward_activation(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_weight(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- merging -------------------------------------------------------------------------------
    def _check_folds(self) -> None:
        if not self.folds_in_place:
            raise ValueError(
                f"a {type(self.base_layer).__name__} transforms its stored weight before the "
                "conv (e.g. weight standardisation), so W0 + s*dW cannot be written back into "
                "it; merge_adapters(model) (unload=True) replaces the layer by an equivalent "
                "plain layer holding the merged effective weight instead")

    def _restore_flags(self, layer: nn.Module) -> nn.Module:
        flags = self._base_requires_grad
        for n, p in layer.named_parameters():
            # a parametrised base stores its weight as parametrizations.weight.original
            p.requires_grad_(flags.get(n, flags.get(f"parametrizations.{n}.original", False)))
        return layer

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` in place (keeps W0 for :meth:`unmerge`).
        Refused (``ValueError``) for a layer that transforms its weight: see :meth:`unload`."""
        if self.merged:
            return
        self._check_folds()
        w = self.base_layer.weight
        new = self.merged_weight().to(w.dtype)
        self._unmerged_weight = w.detach().clone()
        w.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (restores the stored original weight)."""
        if not self.merged:
            return
        assert self._unmerged_weight is not None
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """Merge and return the layer to put in the wrapper's place, trainability as before
        wrapping: the base layer with ``W0 + s dW`` written into its weight, or, where that
        cannot be (:attr:`folds_in_place` False), a new :meth:`plain_layer`."""
        if not self.folds_in_place:
            if self.merged:  # cannot happen (merge refuses), but never return a stale layer
                raise RuntimeError("unload() on a merged wrapper that cannot fold")
            return self.plain_layer()
        self.merge()
        self._unmerged_weight = None
        return self._restore_flags(self.base_layer)

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, kind={self.kind}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, mode={self.mode}, merged={self.merged}"
        )


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
        """LoRA-FA's lean path saves ``h = conv_A(x)`` (``g r`` channels at the output size)
        instead of ``x``; on depthwise/grouped layers ``g r`` often exceeds ``C_in``, and then
        keeping ``x`` is smaller, so this decides per layer and input shape."""
        n, (ho, wo) = self._geometry(x_shape)
        return self.groups * self.rank * ho * wo < x_shape[-3] * x_shape[-2] * x_shape[-1]

    def _forward_activation(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        xp = self._pad(x)
        frozen = not (self.lora_A.requires_grad
                      or any(p.requires_grad for p in base.parameters()))
        if (self.freeze_a and frozen and torch.is_grad_enabled()
                and isinstance(self.dropout, nn.Identity) and self.fa_saves_less(tuple(x.shape))):
            # Both convs on x have frozen weights: run them through a Function that keeps only
            # the weight, so the one activation saved here is h (for B's gradient).
            geo = (base.stride, self._conv_pad, base.dilation, base.groups)
            y = frozen_conv2d(xp, self.base_weight(), base.bias, *geo)
            h = frozen_conv2d(xp, self.a_conv_weight(), None, *geo)
            b = F.conv2d(h, self.b_conv_weight(), None, 1, 0, 1, self.groups)
            return y.add_(b, alpha=self.scaling)
        y = self._conv(xp, self.base_weight(), base.bias)
        # In place: the frozen conv's backward does not need its output, so this saves a copy.
        return y.add_(self.lora_branch(self._lora_input(x, xp)), alpha=self.scaling)

    def _forward_weight(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(self._pad(x), self.merged_weight(), self.base_layer.bias)

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
        return {
            "activation": (fa.forward + fb.forward, fa.backward + fb.backward),
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
