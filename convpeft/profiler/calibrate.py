"""Calibrate the scratch model on the device at hand: a few small real updates, every op traced.

:func:`calibrate` runs one instrumented update of each configuration in ``CALIBRATION`` (plain
and memory-lean adapters and full fine-tuning with BN in train mode on MobileNetV2, ResNet18,
ConvNeXt-tiny and RegNetX-400MF: the conv kinds, layouts, passes and output masks the planner
meets, and the other ops of those nets) on ``device``, with the allocator read
per op (:mod:`.cpu_trace` on the CPU, the CUDA probe on a GPU), fits the per-op scratch model of
:mod:`.scratch` to every op's measured excess, and caches the fit per (device name, torch
version), where :func:`~convpeft.profiler.scratch.scratch_model` (hence ``analytic_profile`` and
the planner) finds it. It returns each update's measured device peak next to the fitted model's
prediction, so the fit's error is visible at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from convpeft.profiler.scratch import (
    ScratchModel,
    device_name,
    fit_scratch,
    relative_error,
    save_calibration,
)

#: (model, method, bn, lean, checkpointed) of the calibration updates
CALIBRATION = (
    ("mobilenet_v2", "full", "train", False, False),
    ("mobilenet_v2", "lora", "freeze", True, False),
    ("mobilenet_v2", "lora-fa", "freeze", True, True),
    ("resnet18", "full", "train", False, False),
    ("resnet18", "lora", "freeze", True, False),
    ("resnet18", "dora", "freeze", False, False),
    # channels-last convs (ConvNeXt's depthwise 7x7 after its permuted LayerNorm blocks),
    # LayerNorm, GELU and Linear; grouped convs and LoRA-FA's strided shape stubs (RegNet)
    ("convnext_tiny", "lora", "freeze", True, False),
    ("regnet_x_400mf", "lora-fa", "freeze", True, False),
    ("regnet_x_400mf", "full", "train", False, False),
)


@dataclass
class Calibration:
    """What :func:`calibrate` did: the fitted ``model``, where it was cached (``path``, None if
    not saved) and one row per calibration update (``config``, ``measured`` and ``predicted``
    device peak in bytes, ``error`` = predicted / measured - 1)."""

    model: ScratchModel
    path: Path | None
    rows: list[dict] = field(default_factory=list)


def prepared_update(model_name: str | torch.nn.Module, method: str, bn: str, lean: bool,
                    ckpt: bool, *,
                    rank: int = 8, num_classes: int = 10, device: str | torch.device = "cpu",
                    target: str = "conv"):
    """A :func:`convpeft.methods.prepare`-d model (adapters on the ``target`` layers, head
    trainable) in train mode, memory-lean / checkpointed if asked, on ``device``.
    ``model_name`` is a torchvision name (:func:`convpeft.models.build_model`) or a model."""
    from convpeft.memory.checkpoint import checkpoint_blocks
    from convpeft.memory.lean import lean_activations
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model

    model = (build_model(model_name, num_classes) if isinstance(model_name, str)
             else model_name).to(device)
    p = prepare(model, MethodConfig(method, rank=rank, bn=bn, target=target))
    p.train_mode()
    if lean:
        lean_activations(p.model)
    if ckpt:
        checkpoint_blocks(p.model)
    return p


def calibrate(device: str | torch.device = "cpu", *, batch: int = 8, resolution: int = 96,
              configs=CALIBRATION, save: bool = True, seed: int = 0) -> Calibration:
    """Fit and cache the scratch model of ``device`` (see the module docstring). ``batch`` x
    ``resolution`` is the size of the calibration updates (the fit is in bytes per operand, so
    it carries to other sizes; :mod:`benchmarks.device_truth` checks that it does)."""
    from convpeft.profiler.engine import plain_update, run_instrumented
    from convpeft.profiler.profile import analytic_profile

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("calibrate(device='cuda'): no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"calibrate(device={str(device)!r}): only 'cpu' and 'cuda' are read")
    if batch < 1 or resolution < 32:
        raise ValueError("calibrate needs batch >= 1 and resolution >= 32")
    loss_fn = torch.nn.CrossEntropyLoss()
    samples, runs = [], []
    for cfg in configs:
        torch.manual_seed(seed)
        p = prepared_update(*cfg, device=device)
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        plain_update(p.model, p.optimizer, x, y, loss_fn)  # optimizer state exists
        run = run_instrumented(p.model, p.optimizer, x, y, loss_fn, compare_torch=False,
                               trace=device.type == "cpu", collect_scratch=True)
        samples += [(s, e) for s, e in run.op_scratch or [] if s is not None]
        runs.append((cfg, p, run.memory.peak))
    name = device_name(device)
    source = f"calibrated on {name}, torch {torch.__version__.split('+')[0]}"
    model = fit_scratch(samples, device=device.type, source=source, min_excess=4096)
    rows = []
    for cfg, p, measured in runs:
        a = analytic_profile(p.model, p.optimizer, (batch, 3, resolution, resolution),
                             compare_torch=False, device=device.type, scratch=model)
        rows.append({"config": "/".join(str(c) for c in cfg), "measured": measured,
                     "predicted": a.memory_peak,
                     "error": relative_error(a.memory_peak, measured)})
    path = save_calibration(model, device) if save else None
    return Calibration(model=model, path=path, rows=rows)
