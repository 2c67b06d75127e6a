"""``lean_activations``: swap, in place and reversibly, the ``forward`` of frozen layers.

The module object stays where it is (same class, same parameters and buffers, so
``state_dict`` keys and values are untouched and checkpoints load either way); only an
instance attribute ``forward`` is set, which :func:`restore_activations` deletes again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from convpeft.core.amp import autocast_dtype
from convpeft.core.atomic import model_transaction
from convpeft.core.conv_variants import registered_conv_variant
from convpeft.core.layer_kinds import layer_kind
from convpeft.memory.checkpoint import in_checkpointed_block
from convpeft.memory.forwards import foreign_forward, remove_forward, set_forward, undo_marked
from convpeft.memory.lean.probe import outputs_saved_downstream
from convpeft.memory.lean.saved import saved_bytes_by_layer
from convpeft.ops.conv import channel_affine, frozen_conv2d, in_func_transform, pad2d
from convpeft.ops.masks import clamp_masked, leaky_relu_masked
from convpeft.ops.pool import max_pool2d_lean, pool_offsets_fit

__all__ = ["LeanReport", "LeanRow", "lean_activations", "restore_activations"]

_OWNER = "_convpeft_lean_owner"  # the report whose call made the module lean (see undo)
_MARK = "_convpeft_lean"  # attribute on a lean module: what was done ("conv", "norm", "act")
_NAME = "_convpeft_lean_name"  # its name in the model, for the unfrozen-later warning
_SHARED = "_convpeft_lean_shared"  # on a clamp activation: save the output, not a mask
_WARNED = "_convpeft_lean_warned"


def _frozen(*params: torch.Tensor | None) -> bool:
    return not any(p is not None and p.requires_grad for p in params)


def _records(x: torch.Tensor) -> bool:
    """Would autograd record an op on ``x``? (If not, the plain path saves nothing.) Under a
    ``torch.func`` transform the plain path runs too (see :func:`.functions.in_func_transform`)."""
    return torch.is_grad_enabled() and x.requires_grad and not in_func_transform()


def _warn_unfrozen(m: nn.Module) -> None:
    if not getattr(m, _WARNED, False):
        setattr(m, _WARNED, True)
        warnings.warn(
            f"layer {getattr(m, _NAME, '?')!r} was made lean while frozen and is trainable now: "
            "it runs its plain forward (saves its input; gradients stay exact). Call "
            "convpeft.lean_activations(model) again after changing what is trainable.",
            stacklevel=3)


def _conv_padding(m: nn.Conv2d, padding_mode: str):
    """``(explicit pad for F.pad or None, numeric conv padding)``: ``'same'``/``'valid'``
    and non-zero padding modes become an explicit pad then an unpadded conv, as torch does."""
    if padding_mode == "zeros" and not isinstance(m.padding, str):
        return None, tuple(m.padding)
    left, right, top, bottom = m._reversed_padding_repeated_twice
    if padding_mode == "zeros" and left == right and top == bottom:
        return None, (top, left)
    return tuple(m._reversed_padding_repeated_twice), (0, 0)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # nn.Conv2d or a registered variant (timm's Conv2dSame, StdConv2d, ...): the same
    # computation as its own forward, with the variant's padding and effective weight
    if not _records(x):
        return type(self).forward(self, x)  # nothing would be saved: plain path
    if not _frozen(*self.parameters()):
        _warn_unfrozen(self)
        return type(self).forward(self, x)
    variant = registered_conv_variant(self)
    assert variant is not None  # only registered convs are made lean
    mode = self.padding_mode if variant.padding_mode else "zeros"
    pad, conv_pad = _conv_padding(self, mode)
    x = variant.pad_input(self, x)
    if pad is not None:
        x = pad2d(x, pad, mode)
    with torch.no_grad():  # frozen: the effective weight is a constant for this update
        weight = variant.effective_weight(self)
    return frozen_conv2d(x, weight, self.bias, self.stride, conv_pad, self.dilation,
                         self.groups)


def _norm_forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    bias_grad = self.bias is not None and self.bias.requires_grad
    if (self.training or not torch.is_grad_enabled() or not (x.requires_grad or bias_grad)
            or in_func_transform()):
        return type(self).forward(self, x)  # batch statistics, or nothing would be saved
    if self.weight is not None and self.weight.requires_grad:
        _warn_unfrozen(self)
        return type(self).forward(self, x)
    with torch.no_grad():
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
    if self.bias is not None:  # outside no_grad: a trainable bias (BitFit) gets its gradient
        shift = shift + self.bias
    return channel_affine(x, scale.to(x.dtype), shift.to(x.dtype))


def _clamp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _records(x):
        return type(self).forward(self, x)
    # its consumer saves the output anyway (.probe): keep that, not a mask. Not under an
    # autocast cast (the consumer would save a cast copy, which the probe, run without
    # autocast, cannot see), and not inside a checkpointed block: keeping y holds it until
    # this layer's backward, past the consumer's, which costs one tensor at the backward
    # peak, while a block's masks are only one block's worth (measured: MobileNetV2 LoRA
    # lean + ckpt at b64/224, 866 MiB with masks, 1078 MiB sharing)
    keep = (getattr(self, _SHARED, False) and autocast_dtype(x) in (None, x.dtype)
            and not in_checkpointed_block())
    if isinstance(self, nn.ReLU):
        return clamp_masked(x, 0.0, None, self.inplace, keep)
    return clamp_masked(x, float(self.min_val), float(self.max_val), self.inplace, keep)


def _leaky_forward(self: nn.LeakyReLU, x: torch.Tensor) -> torch.Tensor:
    if not _records(x):
        return nn.LeakyReLU.forward(self, x)
    return leaky_relu_masked(x, float(self.negative_slope), self.inplace)


def _pool_forward(self: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    if not _records(x) or x.dim() != 4:
        return nn.MaxPool2d.forward(self, x)
    return max_pool2d_lean(x, self.kernel_size, self.stride, self.padding, self.dilation,
                           self.ceil_mode)


# exact types: a subclass's forward may do more than the op we replace it with
_LEAN_FORWARDS: dict[type, tuple[str, Callable]] = {
    nn.Conv2d: ("conv", _conv_forward),
    nn.BatchNorm2d: ("norm", _norm_forward),
    nn.ReLU: ("act", _clamp_forward),
    nn.ReLU6: ("act", _clamp_forward),
    nn.Hardtanh: ("act", _clamp_forward),
    nn.LeakyReLU: ("act", _leaky_forward),
    nn.MaxPool2d: ("pool", _pool_forward),
}


@dataclass
class LeanRow:
    """One layer: ``action`` is ``"conv"``, ``"norm"``, ``"act"``, ``"pool"`` when made lean, else
    ``"plain"`` with ``reason``. ``kind`` uses :mod:`convpeft.core.layer_kinds` for convs.
    ``plain_bytes``/``lean_bytes``: what the layer itself saved for backward in one forward of
    the ``example_input`` (``None`` without one)."""

    name: str
    module: str
    action: str
    kind: str | None = None
    reason: str = ""
    plain_bytes: int | None = None
    lean_bytes: int | None = None
    saves: str = ""  # what a lean layer keeps for backward (see _SAVES)


# what each lean action keeps for backward (besides resident parameters)
_SAVES = {"conv": "its weight only, no input", "norm": "nothing (per-channel scale)",
          "act": "1-bit mask", "pool": "1 byte per output (argmax offset)"}
_SHARED_SAVES = "its output, which the next layer saves anyway (no mask)"
_CLAMPS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)


@dataclass
class LeanReport:
    """What :func:`lean_activations` did; ``undo()`` restores the plain forwards.

    With an ``example_input``, ``plain_bytes``/``lean_bytes`` map every module name (``""``:
    outside any module) to the bytes it saved for backward, before and after.
    """

    rows: list[LeanRow] = field(default_factory=list)
    plain_bytes: dict[str, int] = field(default_factory=dict)
    lean_bytes: dict[str, int] = field(default_factory=dict)
    probe_error: str | None = None  # why no activation shares its output (masks everywhere)
    _modules: list[nn.Module] = field(default_factory=list, repr=False)
    _token: object = field(default_factory=object, repr=False, compare=False)

    @property
    def lean(self) -> list[LeanRow]:
        return [r for r in self.rows if r.action != "plain"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def totals(self) -> tuple[int, int]:
        """``(plain, lean)`` bytes saved for backward over the whole model (one forward)."""
        return sum(self.plain_bytes.values()), sum(self.lean_bytes.values())

    def undo(self) -> int:
        """Restore the plain forward of the layers this call made lean; returns how many. Only
        what this call did: a layer a later :func:`lean_activations` call re-decided (that call
        restores everything first) belongs to the later report, so undoing a stale report
        leaves the newer call's layers lean (use :func:`restore_activations` for all)."""
        n = 0
        for m in self._modules:
            if m.__dict__.get(_OWNER) is self._token:
                _restore(m)
                n += 1
        self._modules.clear()
        return n


def _restore(m: nn.Module) -> None:
    if getattr(m, _MARK, None) is not None:
        # a sparse wrapper over it (convpeft.memory.forwards) stays; a module made lean before the
        # forwards were stacked (an old pickle) has its forward popped as before
        if not remove_forward(m, "lean"):
            m.__dict__.pop("forward", None)
        for attr in (_MARK, _NAME, _WARNED, _SHARED, _OWNER):
            m.__dict__.pop(attr, None)


def _plain_reason(name: str, m: nn.Module, adapted_bases: set[str],
                  convs: bool, norms: bool, activations: bool, pools: bool) -> str:
    action = "conv" if isinstance(m, nn.Conv2d) else _LEAN_FORWARDS[type(m)][0]
    if not {"conv": convs, "norm": norms, "act": activations, "pool": pools}[action]:
        return f"{action}s=False"
    if foreign_forward(m):
        return "forward replaced on the instance by other code (run as it is)"
    if action == "pool":
        if m.return_indices:
            return "return_indices=True (the caller gets the int64 indices anyway)"
        if not pool_offsets_fit(m.kernel_size):
            return "kernel window over 256 positions (offsets do not fit a byte)"
    if action == "conv":
        if registered_conv_variant(m) is None:
            return ("nn.Conv2d subclass with its own forward, not registered in "
                    "convpeft.core.conv_variants (run as it is)")
        if parametrize.is_parametrized(m):
            return "parametrized weight (run as it is)"
        if name in adapted_bases:
            return "adapter base layer: its input is saved once for the adapter's A"
        if not _frozen(*m.parameters()):
            return "trainable weight or bias (their gradients need the input)"
    if action == "norm":
        # train/eval is decided per call (model.train() comes after this, in most loops): a
        # BN in train mode runs its plain forward, since batch statistics need the input
        if m.running_var is None:
            return "no running statistics (batch statistics need the input)"
        if m.weight is not None and m.weight.requires_grad:
            return "trainable scale (its gradient needs the normalised input)"
    return ""


def lean_activations(model: nn.Module, *, convs: bool = True, norms: bool = True,
                     activations: bool = True, pools: bool = True, share_outputs: bool = True,
                     example_input: torch.Tensor | None = None) -> LeanReport:
    """Make ``model``'s frozen convs, eval-mode BatchNorms with a frozen scale, ReLU /
    ReLU6 / LeakyReLU / Hardtanh and MaxPool2d save only what backward needs (see
    :mod:`convpeft.memory.lean`), in place. Outputs and gradients are unchanged.

    Decided per layer *now*: freeze parameters first (BN train/eval is checked per call). A
    layer unfrozen later warns once and runs its plain forward; calling this again
    re-decides. ``share_outputs``: a ReLU / ReLU6 / Hardtanh whose output the next layer
    saves anyway (an adapted or trainable conv) saves that output instead of a mask, found by
    one forward on a meta copy (:mod:`.probe`, input ``example_input``'s shape or
    ``(2, C, 64, 64)``; ``report.probe_error`` says why not, if it failed: masks everywhere).
    ``example_input`` (a real tensor, e.g. ``torch.randn(2, 3, 224, 224)``) also measures the
    bytes each layer saves for backward, plain and lean, into the report.
    ``report.undo()`` (or :func:`restore_activations`) restores every plain forward.
    """
    with model_transaction(model):  # a failed call (probe, measurement) changes nothing
        return _lean_activations(model, convs, norms, activations, pools, share_outputs,
                                 example_input)


def _lean_activations(model: nn.Module, convs: bool, norms: bool, activations: bool,
                      pools: bool, share_outputs: bool,
                      example_input: torch.Tensor | None) -> LeanReport:
    restore_activations(model)
    plain = saved_bytes_by_layer(model, example_input) if example_input is not None else {}
    adapted_bases = {f"{n}.base_layer" if n else "base_layer"
                     for n, m in model.named_modules() if hasattr(m, "base_layer")}
    report = LeanReport(plain_bytes=plain)
    for name, m in model.named_modules():
        spec = _LEAN_FORWARDS.get(type(m))
        if spec is None and isinstance(m, nn.Conv2d):
            spec = _LEAN_FORWARDS[nn.Conv2d]  # a subclass: _plain_reason checks its variant
        if spec is None:
            continue
        action, fwd = spec
        reason = _plain_reason(name, m, adapted_bases, convs, norms, activations, pools)
        kind = layer_kind(m) if action == "conv" else None
        if reason:
            report.rows.append(LeanRow(name, type(m).__name__, "plain", kind, reason))
            continue
        set_forward(m, "lean", fwd)  # under a sparse wrapper if there is one
        setattr(m, _MARK, action)
        setattr(m, _NAME, name)
        setattr(m, _OWNER, report._token)
        report._modules.append(m)
        report.rows.append(LeanRow(name, type(m).__name__, action, kind, saves=_SAVES[action]))
    if share_outputs:
        _share_outputs(model, report, example_input)
    if example_input is not None:
        report.lean_bytes = saved_bytes_by_layer(model, example_input)
        for r in report.rows:
            r.plain_bytes = plain.get(r.name, 0)
            r.lean_bytes = report.lean_bytes.get(r.name, 0)
    return report


def _share_outputs(model: nn.Module, report: LeanReport,
                   example_input: torch.Tensor | None) -> None:
    modules = dict(model.named_modules())
    clamps = [r.name for r in report.rows
              if r.action == "act" and type(modules[r.name]) in _CLAMPS]
    if not clamps:
        return
    try:
        shared = outputs_saved_downstream(
            model, clamps, None if example_input is None else tuple(example_input.shape))
    except Exception as e:  # noqa: BLE001 - any failure: keep the masks (always exact)
        report.probe_error = (f"{type(e).__name__}: {e}"[:300] + " (every activation keeps a "
                              "mask; pass example_input=<a batch the model accepts> so that "
                              "the probe can run)")
        return
    for r in report.rows:
        if r.name in shared:
            setattr(modules[r.name], _SHARED, True)
            r.saves = _SHARED_SAVES


def restore_activations(model: nn.Module) -> int:
    """Undo :func:`lean_activations` on every module of ``model``; returns how many."""
    return undo_marked(model, _MARK, _restore)
