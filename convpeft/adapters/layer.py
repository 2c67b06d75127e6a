"""What every adapter wrapper shares (LoRA and DoRA, conv and linear): :class:`AdapterLayer`.

The wrapper keeps the frozen base layer as ``base_layer``, owns the two factors ``lora_A`` /
``lora_B`` and their settings (read from its :class:`~convpeft.adapters.config.AdapterConfig`),
and does everything that does not depend on the layer kind: merging ``W0 + s dW`` in place and
undoing it exactly, unloading to a plain layer, and choosing the computation per forward.
Subclasses (:mod:`convpeft.adapters.lora`, :mod:`convpeft.adapters.dora`) supply the two
computations and what each costs; the formulas are in :mod:`convpeft.adapters.lora`.

Activation space wins for dense convs on large feature maps, weight space for depthwise and thin
layers (its extra cost does not grow with ``g * r``). ``"auto"`` decides per layer, per input
shape and device (the reason is kept in ``last_reason`` and shown by the adapter report):

* on CUDA (:data:`WEIGHT_SPACE_DEVICES`): weight space. The GPU cost model comes from published
  H100 figures, not from a measurement here: weight space within 1.06-1.20x of full fine-tuning,
  activation space 1.3-5x slower on depthwise-heavy nets;
* elsewhere (CPU): both are evaluated with :mod:`convpeft.core.flops` (forward + backward while
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
from torch import nn
from torch.nn.utils import parametrize

from convpeft.core.layer_kinds import layer_kind

from .config import AdapterConfig

WEIGHT_SPACE_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types on which ``mode="auto"`` takes weight space regardless of FLOPs. The cost model
is taken from published figures, not measured here (no GPU was available when it was written):
on an H100, weight space ran within 1.06-1.20x of full fine-tuning's step time, activation space
1.3-5x slower on depthwise-heavy nets (two extra thin convs per layer are launch- and
memory-bound on a GPU, where FLOPs do not predict time)."""


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
        # A merged-reversible layer saves and loads as if unmerged (see _state_dict_unmerged);
        # module-level functions, so the model still pickles and deep-copies.
        self._remerge_after_load: str | None = None
        self.register_state_dict_post_hook(_state_dict_unmerged)
        self.register_load_state_dict_post_hook(_remerge_after_load)

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
        that path (:class:`~convpeft.adapters.lora.LoRAConv2d`)."""
        return False

    def trainable_adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter tensors that train: all of them, or all but ``A`` with ``freeze_a``."""
        return [p for p in self.adapter_parameters() if not (self.freeze_a and p is self.lora_A)]

    def num_adapter_params(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def base_weight(self) -> torch.Tensor:
        """The weight the base layer's forward really uses (``W0``; for a conv variant such as a
        weight-standardised conv, its effective weight, :mod:`convpeft.core.conv_variants`)."""
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
        # torch.compile traces this once per graph: the choice is baked into the graph, and
        # reading or filling the cache there would guard on its contents (a cache filled by
        # the first call fails that guard: a second compilation)
        cached = not torch.compiler.is_compiling()
        hit = self._mode_cache.get(key) if cached else None
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
        if cached:
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

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling: refuse here, with
        # the fix, instead of TorchScript's message about converting AdapterConfig
        raise TypeError(
            f"torch.jit.script cannot compile a convpeft adapter ({type(self).__name__} around "
            f"a {type(self.base_layer).__name__}: its forward picks its computation in Python); "
            "merge first: convpeft.merge_adapters(model) replaces every adapter by a plain "
            "layer holding W0 + s*dW, which scripts. (torch.compile and torch.export take the "
            "adapted model as it is.)")

    # -- checkpoints ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A state dict always holds W0 (a merged layer saves its unmerged weight), so a merged
        # layer loads unmerged (its children load after this) and merges again afterwards, with
        # what was loaded (_remerge_after_load): the update is never counted twice or dropped.
        if self.merged:
            self.unmerge()
            assign = local_metadata.get("assign_to_params_buffers", False)
            self._remerge_after_load = "assign" if assign else "copy"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, kind={self.kind}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, mode={self.mode}, merged={self.merged}"
        )


def _state_dict_unmerged(module: AdapterLayer, state_dict: dict, prefix: str,
                         local_metadata: dict) -> None:
    """State-dict hook: a merged-reversible layer (``merge_adapters(model, unload=False)``)
    saves its *unmerged* base weight ``W0`` next to ``A``, ``B`` (and DoRA's ``m``), so its
    state dict equals the unmerged layer's and loads into any adapted model without counting
    ``s dW`` twice. (``_unmerged_weight`` is the detached copy :meth:`AdapterLayer.merge`
    keeps, the tensor :meth:`AdapterLayer.unmerge` writes back.)"""
    key = f"{prefix}base_layer.weight"
    if module.merged and module._unmerged_weight is not None and key in state_dict:
        state_dict[key] = module._unmerged_weight


def _remerge_after_load(module: AdapterLayer, incompatible_keys) -> None:
    """Load-state-dict post hook: merge again a layer that was merged before the load (see
    :meth:`AdapterLayer._load_from_state_dict`), now with the loaded ``W0``, ``A``, ``B``."""
    how, module._remerge_after_load = module._remerge_after_load, None
    if how is None:
        return
    base = module.base_layer
    if how == "assign":
        # load_state_dict(assign=True) made the caller's tensor the weight: merging in place
        # would write W0 + s dW into the caller's state dict, so merge into a copy
        w = base.weight
        base.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    module.merge()
