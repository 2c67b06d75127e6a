"""LoRA-FA's frozen ``A``, set along the directions the layer's input actually takes.

LoRA-FA (Zhang et al. 2023, arXiv 2308.03303) freezes ``A`` and trains ``B``, so every update
``s B A`` of a weight ``W0`` (viewed ``(C_out, K)``, ``K = C_in/g k_h k_w``) lies in the
``r``-dimensional row space of ``A``. The weight gradient ``G^T X`` lies in the span of the
layer's input patches ``X``, so what ``B`` can learn is the share of that gradient inside
``A``'s rows. A random ``A`` holds about ``r / K`` of it: measured on the rank sweep's ResNet18
(new classes, first step, r=16), 0.3-3% on the 3x3 convs (``K`` = 576-4608), 21% over all
convs, against 90% for the gradient's own top-r directions, which is why LoRA-FA fell behind
LoRA at higher rank there while LoRA turns its ``A`` towards the gradient in a few steps.

:func:`calibrate_frozen_a` sets each frozen ``A`` to the top-r principal directions of its
layer's input patches (the top eigenvectors of ``X^T X``), measured on a few training batches
before the first step: 80% of the first gradient's energy on that ResNet18, 54-99% per 3x3 conv.
The base weight's own principal input directions (``W0``'s top right singular vectors) were
tried too and held 32%. The rows keep the random draw's expected norm (``1/sqrt(3)``), so one
AdamW step on ``B`` moves the weight as far as before.

Cost: forward passes only (no graph), ``iters`` passes over at most ``max_images`` images, and per
layer two ``K x r`` matrices: the top-r subspace is found by subspace iteration on ``X^T X``
without forming it (``X^T (X Q)``, the patches unfolded a few images at a time). Training is
unchanged: ``A`` has the same shape and stays frozen, so backward still keeps only ``A x``.
Grouped convs share one ``A`` across groups (:mod:`convpeft.adapters.lora`): their patches are
pooled over the groups. The start vectors are the random ``A`` itself plus a few fixed ones, so
the result follows the seed that drew ``A``, and the caller's RNG is not touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.atomic import model_transaction
from ..core.batchnorm import bn_pass, input_batches, snapshot_bn
from .layer import AdapterLayer

FROZEN_A_ROW_NORM = 3 ** -0.5
"""Norm of each calibrated row of a frozen ``A``: the expected row norm of the random init
``U(-1/sqrt(K), 1/sqrt(K))`` (``sqrt(K / (3 K))``)."""

OVERSAMPLE = 8
"""Extra directions carried through subspace iteration (dropped at the end)."""

PATCH_BYTES = 16 * 2**20
"""Most bytes of unfolded patches held at once per layer (images are unfolded a few at a time)."""


@dataclass
class FrozenACalibration:
    """What :func:`calibrate_frozen_a` did: ``layers`` calibrated, ``images`` per pass,
    ``passes`` over them, and per layer the share of its input patches' energy that ``A``'s rows
    now hold (``captured``, name -> fraction in [0, 1]; the random ``A`` held about ``r/K``)."""

    layers: int
    images: int
    passes: int
    captured: dict[str, float]


def _frozen_a_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, AdapterLayer) and m.freeze_a and not m.merged
            and m.lora_A.device.type != "meta"]  # the analytic mode has no values to set


def _patches(layer: AdapterLayer, x: torch.Tensor) -> Iterable[torch.Tensor]:
    """``layer``'s input as rows of length ``K``, a few images at a time: ``(M, K)`` each."""
    base = layer.base_layer
    if layer.kind == "linear":
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, PATCH_BYTES // max(1, rows.shape[1] * rows.element_size()))
        for a in range(0, rows.shape[0], step):
            yield rows[a:a + step].float()
        return
    k = layer.fan_in
    g = base.groups
    # padding as the conv pads (any padding_mode, "same" included), then unfold without padding
    pad = base._reversed_padding_repeated_twice
    mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
    # one image unfolds to g * K * L values, L <= H * W output positions (stride 1, same size)
    step = max(1, PATCH_BYTES // max(1, g * k * x.shape[-1] * x.shape[-2] * 4))
    for a in range(0, x.shape[0], step):
        xa = x[a:a + step].float()
        if any(pad):
            xa = F.pad(xa, pad, mode=mode)
        cols = F.unfold(xa, base.kernel_size, dilation=base.dilation, stride=base.stride)
        n, _, length = cols.shape  # (n, C_in k_h k_w, L): channel-major, as the weight rows
        yield cols.view(n, g, k, length).permute(0, 1, 3, 2).reshape(-1, k)


def _batches(data, batch_size: int, device: torch.device, max_images: int) -> list[torch.Tensor]:
    if hasattr(data, "batches") and len(data) > max_images:  # convpeft.data.ImageDataset
        # evenly spread over the dataset: a class-sorted one stays covered
        n = len(data)
        data = data.subset([i * n // max_images for i in range(max_images)])
    out, seen = [], 0
    for x in input_batches(data, batch_size, device, "calibrate_frozen_a"):
        x = x[: max_images - seen]
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            # one NaN pixel spreads through X^T X and eigh fails to converge much later
            raise ValueError(f"calibrate_frozen_a: batch {len(out)} of data contains NaN or "
                             "inf; pass finite inputs (check the data's normalisation)")
        out.append(x)
        seen += x.shape[0]
        if seen >= max_images:
            break
    if not seen:
        raise ValueError("calibrate_frozen_a: data yielded no images")
    return out


@torch.no_grad()
def calibrate_frozen_a(model: nn.Module, data, *, batch_size: int = 64,
                       device: torch.device | str | None = None, iters: int = 4,
                       max_images: int = 256, train_mode=None) -> FrozenACalibration:
    """Set every frozen ``A`` of ``model`` (LoRA-FA layers: ``freeze_a=True``, not merged) to the
    top-r principal directions of its layer's inputs on ``data``; see the module docstring.

    ``data``: a :class:`~convpeft.data.ImageDataset` or an iterable of input batches (tensors,
    or tuples whose first item is the input, e.g. a ``DataLoader``); at most ``max_images``
    images are used (from a dataset, spread evenly over it; from an iterable, the first
    ones), in batches of ``batch_size`` for a dataset. ``iters``: forward passes;
    each but the last is one step of subspace iteration, the last picks the top r directions
    of the subspace found (Rayleigh-Ritz) and measures ``captured``.
    ``train_mode()`` sets the modes of the passes (default ``model.train()``: BN normalises
    with batch statistics, as the inputs will be during training); BN running statistics, module
    modes and the RNG are left as they were. Call before the first optimizer step:
    ``convpeft.train.finetune`` does for method ``lora-fa`` (``MethodConfig.fa_init="data"``).
    """
    for key, v in (("batch_size", batch_size), ("iters", iters), ("max_images", max_images)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{key} must be an int (got {v!r})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if iters < 1:
        raise ValueError(f"iters must be >= 1 (got {iters})")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1 (got {max_images})")
    layers = _frozen_a_layers(model)
    if not layers:
        return FrozenACalibration(0, 0, 0, {})
    if device is None:
        device = next(model.parameters()).device
    batches = _batches(data, batch_size, torch.device(device), max_images)
    # start vectors (K x p): the random A's rows plus OVERSAMPLE fixed ones (a local generator:
    # the caller's RNG is not touched), orthonormalised; iterating on p > r columns converges
    # at the rate lambda_{p+1} / lambda_r instead of lambda_{r+1} / lambda_r
    q = {}
    for name, m in layers:
        rows = m.lora_A.detach().reshape(m.rank, -1).float().cpu()
        p = min(m.rank + OVERSAMPLE, m.fan_in)
        extra = torch.randn(max(0, p - m.rank), m.fan_in,
                            generator=torch.Generator().manual_seed(m.fan_in))
        q[name] = torch.linalg.qr(torch.cat([rows, extra])[:p].T).Q
    final: dict[str, torch.Tensor] = {}
    acc: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    measure = False

    def hook(name: str, layer: AdapterLayer):
        def pre(mod, args):
            x = args[0]
            if layer.kind != "linear" and (x.dim() != 4
                                           or x.shape[1] != layer.base_layer.in_channels):
                return  # not this conv's input: let the conv itself say what it expected
            qn = q[name].to(x.device)
            y = acc.get(name)
            for p in _patches(layer, x):
                part = p.T @ (p @ qn)
                y = part if y is None else y.add_(part)
                if measure:  # tr(X^T X), for the share the final A holds
                    energy[name] = energy.get(name, 0.0) + float(p.square().sum())
            acc[name] = y
        return pre

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers]
    try:
        with model_transaction(model), snapshot_bn(model), bn_pass(model, train_mode, device):
            for it in range(iters):
                measure = it == iters - 1
                acc.clear()
                energy.clear()
                for x in batches:
                    model(x)
                captured = {}
                for name, layer in layers:
                    y = acc.get(name)
                    if y is None:  # the forward never reached this layer
                        continue
                    y = y.cpu()
                    if it < iters - 1:
                        q[name] = torch.linalg.qr(y).Q
                        continue
                    # last pass: Rayleigh-Ritz in span(q) (T = q^T X^T X q, p x p); A's rows are
                    # the top r Ritz vectors, which hold sum(top r eigenvalues of T) of the
                    # patches' energy tr(X^T X)
                    lam, u = torch.linalg.eigh((q[name].T @ y).double())
                    r = min(layer.rank, y.shape[0])
                    final[name] = (q[name] @ u.flip(-1)[:, :r].float())
                    captured[name] = float(lam.flip(-1)[:r].sum()) / max(energy[name], 1e-30)
    finally:
        for h in handles:
            h.remove()
    done = 0
    for name, m in layers:
        if name not in final:
            continue
        rows = m.lora_A.data.view(m.rank, -1)
        k = final[name].shape[1]
        rows[:k] = (final[name].T * FROZEN_A_ROW_NORM).to(dtype=rows.dtype, device=rows.device)
        done += 1
    return FrozenACalibration(layers=done, images=sum(x.shape[0] for x in batches),
                              passes=iters, captured=captured)
