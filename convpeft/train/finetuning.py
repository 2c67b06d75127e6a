"""Adapting a source model to a task with one method, and what came of it.

:func:`finetune` copies the model (the caller's stays untouched), expands the head for new
classes, measures the zero-shot accuracies (or takes them from the caller: a sweep runs many
methods from one source model), prepares the method (:func:`convpeft.methods.prepare`) and
trains it (at a constant learning rate, or warm-up + cosine: :mod:`convpeft.train.schedule`). The
outcome is a :class:`FinetuneResult`: accuracies, forgetting, the share of a shift's drop won
back, parameter counts and timings, JSON-able without the model.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from convpeft.core.amp import check_amp, grad_scaler
from convpeft.core.layer_kinds import layer_kind

from ..adapters.lora_fa import calibrate_frozen_a
from ..data import Task
from ..methods import MethodConfig, prepare
from ..models import expand_head, get_head
from .batchnorm import adapt_prefix_bn, recalibrate_bn, snapshot_bn
from .evaluation import evaluate
from .loop import _batches_per_epoch, _progress, _train_epoch, default_device
from .schedule import lr_multiplier, make_scheduler


@dataclass
class FinetuneResult:
    """Outcome of one adaptation run. ``to_dict()`` is flat-ish and JSON-able (no model).

    Accuracies are in [0, 1]. ``zero_shot_acc``/``zero_shot_source_acc``: the source model
    before any update (for new_classes, with the freshly expanded head). ``forgetting`` =
    ``zero_shot_source_acc - source_acc``. ``recovered_fraction`` (shift only) = share of the
    shift's drop (clean minus zero-shot) won back. ``train_time_s``: the optimisation steps only;
    ``wall_time_s``: the whole call incl. evaluations. ``amp``: the training compute dtype
    ("off" = fp32). ``precise_bn``: BN statistics recomputed for the final weights before
    evaluating (see :func:`finetune`). ``schedule``: the learning-rate schedule; ``steps``: the
    optimizer steps taken. ``val_acc``: accuracy on ``task.target_val`` after training (None
    without a validation split), what :func:`~convpeft.train.select_lr` chooses a rate by.
    ``memory_format``: the layout the model trained in ("auto" resolved).
    """

    method: str
    bn: str
    task: dict
    config: dict
    epochs: int
    batch_size: int
    lr: float
    seed: int
    device: str
    history: list[dict]
    zero_shot_acc: float
    zero_shot_source_acc: float
    target_acc: float
    source_acc: float
    forgetting: float
    recovered_fraction: float | None
    trainable_params: int
    total_params: int
    train_time_s: float
    wall_time_s: float
    report: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    amp: str = "off"
    precise_bn: bool = True
    schedule: str = "constant"
    steps: int = 0
    val_acc: float | None = None
    memory_format: str = "contiguous"

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name != "model"}


def _report_dict(report: Any) -> dict:
    if report is None:
        return {}
    if isinstance(report, dict):
        return {k: v for k, v in report.items() if k != "trainable"}
    to_dict = getattr(report, "to_dict", None)
    return to_dict() if callable(to_dict) else {"repr": str(report)}


def finetune(
    model: nn.Module,
    method: str | MethodConfig,
    task: Task,
    *,
    epochs: int = 2,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    copy_model: bool = True,
    eval_every_epoch: bool = True,
    keep_model: bool = True,
    zero_shot: tuple[float, float] | None = None,
    amp: str = "off",
    precise_bn: bool = True,
    schedule: str = "constant",
    warmup: float = 0.1,
    steps: int | None = None,
    memory_format: str = "contiguous",
) -> FinetuneResult:
    """Adapt ``model`` to ``task.target_train`` with ``method``; see :class:`FinetuneResult`.

    ``method``: a name from :func:`convpeft.methods.list_methods` or a ``MethodConfig``; ``lr``
    overrides its learning rate. For new_classes the head is expanded first (old rows kept
    exactly) when it still has ``task.source_num_classes`` outputs. ``copy_model`` (default)
    leaves the caller's model untouched. ``schedule`` (:mod:`convpeft.train.schedule`):
    "constant" (default) or "cosine" (linear warm-up over the first ``warmup`` share of the
    steps, then a half cosine to zero), stepped once per optimizer step. ``zero_shot``: the
    ``(target, source)`` test accuracies of this same model and seed before any update, when the
    caller already has them (a sweep runs many methods from one source model): the two baseline
    evaluations are then skipped. ``amp`` ("off", "bf16", "fp16"; see the module docstring) is
    checked against ``device`` before anything runs: fp16 on the CPU is refused. ``precise_bn``
    (default): before each evaluation the running statistics of the BNs the method runs in train
    mode are recomputed exactly on ``task.target_train`` for the current weights
    (:func:`~convpeft.train.recalibrate_bn`; one forward pass, no gradients); an evaluation
    before the last epoch puts the running averages back afterwards, so training does not depend
    on how often it evaluates. ``False``: evaluate with the running averages BN collected while
    training (they lag the weights; see :mod:`convpeft.train.batchnorm`). ``steps``: train
    exactly that many optimizer steps whatever the data's size (overrides ``epochs``; the last
    epoch stops early), so tasks of different sizes get the same schedule. ``memory_format``
    (:func:`resolve_memory_format`): "contiguous" (default), "channels_last" (the prepared
    model's 4-D weights, hence its activations; same results up to float rounding) or "auto".
    """
    t_call = time.perf_counter()
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps}); or give epochs instead")
    cfg = MethodConfig(method) if isinstance(method, str) else copy.copy(method)
    if lr is not None:
        cfg.lr = lr
    device = torch.device(device) if device is not None else default_device()
    check_amp(amp, device)
    lr_multiplier(0, 2, schedule, warmup)  # a bad schedule fails before any copy or training
    memory_format = resolve_memory_format(model, memory_format, device)
    if copy_model:
        model = copy.deepcopy(model)
    model.to(device)
    # new head rows, adapter init and anything else drawn from the global RNG follow ``seed``
    torch.manual_seed(seed)
    _, head = get_head(model)
    if task.num_new_classes and head.out_features == task.source_num_classes:
        expand_head(model, task.num_new_classes)
    elif head.out_features != task.num_classes:
        raise ValueError(f"model head has {head.out_features} outputs; the task needs "
                         f"{task.source_num_classes} (source) or {task.num_classes}")

    if zero_shot is None:
        zero_shot = (evaluate(model, task.target_test, device=device),
                     evaluate(model, task.source_test, device=device))
    zero_shot, zero_shot_src = (float(a) for a in zero_shot)

    if cfg.prefix_stats == "target":  # (needs update_blocks) before the sparse wrapping
        adapt_prefix_bn(model, cfg.split(model), task.target_train, device=device,
                        batch_size=max(1, batch_size // cfg.prefix_chunks))
    prepared = prepare(model, cfg)
    if cfg.fa_init == "data":  # LoRA-FA's frozen A along the inputs' principal directions
        calibrate_frozen_a(model, task.target_train, batch_size=batch_size, device=device,
                           train_mode=prepared.train_mode)
    if memory_format == "channels_last":  # in place: the optimizer keeps the same parameters
        model.to(memory_format=torch.channels_last)
    scaler = grad_scaler(device, amp)
    g = torch.Generator().manual_seed(seed)
    history = []
    per_epoch = _batches_per_epoch(len(task.target_train), batch_size)
    if steps is not None:  # whole epochs, the last one cut at the step count
        epochs = -(-steps // max(per_epoch, 1))
    else:
        steps = epochs * per_epoch
    scheduler = make_scheduler(prepared.optimizer, steps, schedule, warmup)
    train_time = 0.0
    with _progress(steps, f"finetune {cfg.name}", progress) as bar:
        for ep in range(epochs):
            start = time.perf_counter()
            loss, acc = _train_epoch(model, prepared.optimizer, task.target_train,
                                     batch_size=batch_size, generator=g, device=device,
                                     train_mode=prepared.train_mode, bar=bar, amp=amp,
                                     scaler=scaler, scheduler=scheduler,
                                     max_steps=steps - ep * per_epoch)
            dt = time.perf_counter() - start
            train_time += dt
            row = {"epoch": ep + 1, "loss": loss, "train_acc": acc, "time_s": dt}
            last = ep == epochs - 1
            if eval_every_epoch or last:
                with contextlib.ExitStack() as stack:
                    if precise_bn:
                        if not last:
                            stack.enter_context(snapshot_bn(model))
                        recalibrate_bn(model, task.target_train, batch_size=batch_size,
                                       device=device, train_mode=prepared.train_mode)
                    row["target_acc"] = evaluate(model, task.target_test, device=device)
            history.append(row)
    model.eval()
    target_acc = history[-1]["target_acc"] if history else zero_shot
    source_acc = evaluate(model, task.source_test, device=device)
    val_acc = (evaluate(model, task.target_val, device=device)
               if task.target_val is not None and len(task.target_val) else None)
    recovered = None
    if task.kind == "shift" and zero_shot_src - zero_shot > 1e-9:
        recovered = (target_acc - zero_shot) / (zero_shot_src - zero_shot)
    return FinetuneResult(
        method=cfg.name, bn=cfg.bn, task=task.config(), config=cfg.to_dict(), epochs=epochs,
        batch_size=batch_size, lr=cfg.resolved_lr, seed=seed, device=str(device),
        history=history, zero_shot_acc=zero_shot, zero_shot_source_acc=zero_shot_src,
        target_acc=target_acc, source_acc=source_acc, forgetting=zero_shot_src - source_acc,
        recovered_fraction=recovered, trainable_params=prepared.trainable_params,
        total_params=prepared.total_params, train_time_s=train_time,
        wall_time_s=time.perf_counter() - t_call, report=_report_dict(prepared.report),
        model=model if keep_model else None, amp=amp, precise_bn=precise_bn,
        schedule=schedule, steps=steps, val_acc=val_acc, memory_format=memory_format,
    )


MEMORY_FORMATS = ("contiguous", "channels_last", "auto")


def resolve_memory_format(model: nn.Module, memory_format: str,
                          device: torch.device | str) -> str:
    """``memory_format`` for training ``model`` on ``device``, "auto" resolved: channels-last on
    the CPU for a net with depthwise convs, else contiguous. Why: oneDNN's NCHW weight gradient
    of a depthwise conv on small feature maps is slow (16 x 960 x 1x1: 5.9 ms, channels-last
    0.6 ms, torch 2.14 on a 2-core AMD EPYC), so a MobileNetV2 step at the sweep's 12x12 ran
    1.3-2x faster channels-last, while ResNet18's ran slower. ``ValueError`` naming the choices
    for anything else."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)} "
                         f"(got {memory_format!r})")
    if memory_format != "auto":
        return memory_format
    depthwise = any(layer_kind(m) == "depthwise" for m in model.modules())
    return "channels_last" if depthwise and torch.device(device).type == "cpu" else "contiguous"
