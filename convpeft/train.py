"""Training: pretrain a source model once (cached), fine-tune it with a method, evaluate.

* :func:`pretrain` trains the source model on ``task.source_train`` and caches its weights under
  ``$CONVPEFT_CACHE`` (default ``$XDG_CACHE_HOME/convpeft``, i.e. ``~/.cache/convpeft``), keyed by
  a hash of everything the weights depend on (recipe, task and a fingerprint of its source
  data, seed, torch version, the thread count and the CPU's SIMD level or GPU that ran it); a
  cache hit loads instead of training. Pretraining runs under :func:`deterministic_torch`.
* :func:`finetune` adapts a copy of a model to ``task.target_train`` with a method from
  :mod:`convpeft.methods` and measures zero-shot (before any update), target and source accuracy.
* :func:`evaluate` is top-1 accuracy.

Runs are repeatable on the CPU for a seed (parameter init, adapter init, shuffling, augmentation
all come from seeded generators). Pretraining goes further (:func:`deterministic_torch`):
deterministic algorithms where torch has them and a fixed intra-op thread count
(``PRETRAIN_DEFAULTS["threads"]``, restored afterwards), inside a forked RNG so a cache hit and
a miss leave the caller's global RNG alike. The same torch, thread count and CPU kind
(``torch.backends.cpu.get_cpu_capability()``) then give bit-identical source weights
(``pretrain_info["weights_sha256"]`` says so); another CPU model may round differently in its
vectorised kernels, and training amplifies that, so accuracies agree across machines only
within their seed intervals while FLOPs and memory agree exactly.
CUDA is used when available unless ``device`` says otherwise.

Mixed precision (``finetune(..., amp="bf16"|"fp16")``, :mod:`convpeft.amp`): forward and loss
under ``torch.autocast``, fp32 master weights and optimizer state; fp16 (CUDA only) scales the
loss with a ``GradScaler``. Pretraining and evaluation stay fp32 (the cached source weights do
not depend on how they are later fine-tuned; accuracy is that of the fp32 weights).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .amp import autocast, check_amp, grad_scaler
from .data import ImageDataset, Task, build_task
from .methods import MethodConfig, prepare
from .models import build_model, expand_head, get_head

__all__ = [
    "PRETRAIN_DEFAULTS",
    "FinetuneResult",
    "resolve_cache_dir",
    "default_device",
    "deterministic_torch",
    "evaluate",
    "recalibrate_bn",
    "finetune",
    "pretrain",
    "state_dict_sha256",
]

# Bump when the pretraining recipe changes, so stale cached weights are not reused.
# 2: deterministic algorithms, fixed thread count, forked RNG; key names torch/threads/backend;
#    BN running statistics recalibrated on the source data after the last epoch
_RECIPE_VERSION = 2
PRETRAIN_DEFAULTS = {"epochs": 5, "lr": 3e-3, "batch_size": 64, "weight_decay": 1e-4,
                     "augment_shift": 2, "threads": 2}
"""``threads``: intra-op threads during pretraining (a reduction split over another number of
threads sums in another order, so the thread count changes the weights); 2 fits a laptop and
CI, a bigger machine only pretrains a little slower than it could."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def deterministic_torch(threads: int | None = None):
    """Run the block as reproducibly as torch allows; yields the intra-op thread count used.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
    deterministic implementation warns instead of failing), cuDNN deterministic without
    autotuning, and ``torch.set_num_threads(threads)`` when ``threads`` is given. Everything is
    restored on exit, exceptions included. What it cannot fix: another torch version, or a CPU
    whose vectorised kernels (AVX2 vs AVX-512, ...) round differently.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None to keep {torch.get_num_threads()}), "
                         f"got {threads}")
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        if threads is not None:
            torch.set_num_threads(threads)
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.set_num_threads(prev[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[3], prev[4]


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in order): equal on two
    machines exactly when their weights are bit-identical."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _data_fingerprint(ds: ImageDataset) -> str:
    """Short SHA-256 of a dataset's images and labels (what the source model is trained on)."""
    h = hashlib.sha256(ds.images.contiguous().numpy().tobytes())
    h.update(ds.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _backend(device: torch.device) -> str:
    """The hardware kind whose kernels decide the rounding: the CPU's SIMD level, or the GPU."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$CONVPEFT_CACHE``, else ``$XDG_CACHE_HOME/convpeft`` (``~/.cache``)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("CONVPEFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convpeft"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode; the previous mode is restored)."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in dataset.batches(batch_size, device=device):
        correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / len(dataset)


def _random_shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` (zero fill): (N, C, H, W) -> same."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4)
    off = torch.randint(0, 2 * pixels + 1, (n, 2), generator=g).tolist()
    return torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(off)])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageDataset,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    scheduler: Any = None,
    augment_shift: int = 0,
    train_mode: Any = None,
    bar: Any = None,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """One epoch; returns (mean loss, train accuracy). ``train_mode()`` sets module modes.
    ``amp``: forward and loss under autocast; ``scaler``: fp16 loss scaling (skips a step whose
    gradients overflowed and lowers the scale)."""
    (train_mode or model.train)()
    # drop a last batch smaller than half a batch: BN statistics of 1-3 images are noise
    drop_last = len(data) % batch_size < batch_size // 2 and len(data) >= batch_size
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in data.batches(batch_size, shuffle=True, generator=generator, device=device,
                             drop_last=drop_last):
        if augment_shift:
            x = _random_shift(x, augment_shift, generator)
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_v = float(loss.detach())
        total_loss += loss_v * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _batches_per_epoch(n: int, batch_size: int) -> int:
    drop_last = n % batch_size < batch_size // 2 and n >= batch_size
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ----------------------------------------------------------------------------- pretrain
@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageDataset, *, batch_size: int,
                   device: torch.device) -> int:
    """Replace every BatchNorm's running statistics by the exact average over ``data`` (one
    pass in train mode, no gradients, momentum ``None`` = cumulative average); returns the
    number of BN layers. After a short one-cycle run the running averages still remember the
    first steps' weights, and a depthwise-separable net evaluated with them can collapse to one
    class; the recalibrated statistics are those of the final weights. Modes and momenta are
    restored."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in data.batches(batch_size, device=device):
        model(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
    return len(bns)


def _cache_error(path: Path, e: OSError) -> OSError:
    return OSError(f"cannot write the pretrain cache {path} ({e.strerror or e}); set "
                   f"$CONVPEFT_CACHE to a writable folder or pass use_cache=False")


def _check_cache_writable(folder: Path, path: Path) -> None:
    """Create ``folder`` and a probe file in it (removed again); raise naming ``path``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _cache_error(path, e) from e


def pretrain(
    model_name: str = "mobilenet_v2",
    dataset: str = "digits",
    *,
    task: Task | None = None,
    epochs: int = PRETRAIN_DEFAULTS["epochs"],
    lr: float = PRETRAIN_DEFAULTS["lr"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    weight_decay: float = PRETRAIN_DEFAULTS["weight_decay"],
    augment_shift: int = PRETRAIN_DEFAULTS["augment_shift"],
    threads: int | None = PRETRAIN_DEFAULTS["threads"],
    seed: int = 0,
    weights: str | None = None,
    small_input: bool = True,
    resolution: int = 32,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> nn.Module:
    """The source model: ``model_name`` trained on ``task.source_train`` (cached).

    ``task`` defaults to ``build_task("shift", dataset, seed=seed, resolution=resolution)``
    (its source split is the clean training set). Recipe: AdamW, one-cycle LR schedule (with
    at least 8 steps; constant ``lr`` otherwise),
    ``batch_size``, random translations of up to ``augment_shift`` pixels, then the BN
    statistics recalibrated on the source data (:func:`recalibrate_bn`); all under
    :func:`deterministic_torch` with ``threads`` intra-op threads (None: the current count).
    The returned model (eval mode, on ``device``) carries ``model.pretrain_info``: a dict with
    ``cached`` (bool), ``path``, ``key``, ``config`` (what the key hashes), ``train_time_s``
    (of the run that made the weights), ``source_test_acc`` and ``weights_sha256``
    (:func:`state_dict_sha256`: compare it across machines).
    """
    if task is None:
        task = build_task("shift", dataset, seed=seed, resolution=resolution, data_root=data_root)
    elif task.dataset != dataset:
        raise ValueError(f"task is on {task.dataset!r} but dataset={dataset!r}")
    device = torch.device(device) if device is not None else default_device()
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the current count), got {threads}")
    config = {
        "recipe": _RECIPE_VERSION, "model": model_name, "weights": weights,
        "small_input": small_input, "num_classes": task.source_num_classes,
        "task": task.source_config(), "data": _data_fingerprint(task.source_train),
        "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "weight_decay": weight_decay, "augment_shift": augment_shift, "seed": seed,
        "torch": torch.__version__, "backend": _backend(device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "deterministic": True,
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = resolve_cache_dir(cache_dir)
    path = folder / f"pretrain-{model_name}-{task.dataset}-{key}.pt"

    if use_cache and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = build_model(model_name, task.source_num_classes, small_input=small_input)
            model.load_state_dict(blob["state_dict"])
            info = json.loads(blob["info"])
        except Exception as e:  # truncated, garbled or foreign file: rebuild it, say which
            warnings.warn(f"pretrain cache entry {path} is unreadable ({type(e).__name__}: "
                          f"{str(e)[:200]}); pretraining again and replacing it", stacklevel=2)
        else:
            model.to(device).eval()
            model.pretrain_info = {**info, "cached": True, "path": str(path)}
            return model

    if use_cache:  # fail before minutes of training, not after
        _check_cache_writable(folder, path)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()
                   ] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), deterministic_torch(threads):
        torch.manual_seed(seed)
        model = build_model(model_name, task.source_num_classes, weights=weights,
                            small_input=small_input).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * _batches_per_epoch(len(task.source_train), batch_size)
        # one-cycle needs a few steps per phase; a tiny run just uses the constant peak LR
        sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                     pct_start=0.25) if steps >= 8 else None)
        g = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        history = []
        with _progress(steps, f"pretrain {model_name}", progress) as bar:
            for ep in range(epochs):
                loss, acc = _train_epoch(model, opt, task.source_train, batch_size=batch_size,
                                         generator=g, device=device, scheduler=sched,
                                         augment_shift=augment_shift, bar=bar)
                history.append({"epoch": ep + 1, "loss": loss, "train_acc": acc})
        if epochs:
            recalibrate_bn(model, task.source_train, batch_size=batch_size, device=device)
        train_time = time.perf_counter() - start
        model.eval()
        source_test_acc = evaluate(model, task.source_test, device=device)
    info = {"config": config, "key": key, "train_time_s": train_time, "history": history,
            "source_test_acc": source_test_acc, "weights_sha256": state_dict_sha256(model)}
    if use_cache:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": state, "info": json.dumps(info)}, tmp)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise _cache_error(path, e) from e
    model.pretrain_info = {**info, "cached": False, "path": str(path)}
    return model


# ----------------------------------------------------------------------------- finetune
@dataclass
class FinetuneResult:
    """Outcome of one adaptation run. ``to_dict()`` is flat-ish and JSON-able (no model).

    Accuracies are in [0, 1]. ``zero_shot_acc``/``zero_shot_source_acc``: the source model
    before any update (for new_classes, with the freshly expanded head). ``forgetting`` =
    ``zero_shot_source_acc - source_acc``. ``recovered_fraction`` (shift only) = share of the
    shift's drop (clean minus zero-shot) won back. ``train_time_s``: the optimisation steps only;
    ``wall_time_s``: the whole call incl. evaluations. ``amp``: the training compute dtype
    ("off" = fp32).
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
) -> FinetuneResult:
    """Adapt ``model`` to ``task.target_train`` with ``method``; see :class:`FinetuneResult`.

    ``method``: a name from :func:`convpeft.methods.list_methods` or a ``MethodConfig``;
    ``lr`` overrides its learning rate. For new_classes the head is expanded first (old rows
    kept exactly) when it still has ``task.source_num_classes`` outputs. ``copy_model`` (default)
    leaves the caller's model untouched. Constant LR (no schedule) so that methods are compared at
    their own learning rate only. ``zero_shot``: the ``(target, source)`` test accuracies of this
    same model and seed before any update, when the caller already has them (a sweep runs many
    methods from one source model): the two baseline evaluations are then skipped. ``amp``
    ("off", "bf16", "fp16"; see the module docstring) is checked against ``device`` before
    anything runs: fp16 on the CPU is refused.
    """
    t_call = time.perf_counter()
    cfg = MethodConfig(method) if isinstance(method, str) else copy.copy(method)
    if lr is not None:
        cfg.lr = lr
    device = torch.device(device) if device is not None else default_device()
    check_amp(amp, device)
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

    prepared = prepare(model, cfg)
    scaler = grad_scaler(device, amp)
    g = torch.Generator().manual_seed(seed)
    history = []
    steps = epochs * _batches_per_epoch(len(task.target_train), batch_size)
    train_time = 0.0
    with _progress(steps, f"finetune {cfg.name}", progress) as bar:
        for ep in range(epochs):
            start = time.perf_counter()
            loss, acc = _train_epoch(model, prepared.optimizer, task.target_train,
                                     batch_size=batch_size, generator=g, device=device,
                                     train_mode=prepared.train_mode, bar=bar, amp=amp,
                                     scaler=scaler)
            dt = time.perf_counter() - start
            train_time += dt
            row = {"epoch": ep + 1, "loss": loss, "train_acc": acc, "time_s": dt}
            if eval_every_epoch or ep == epochs - 1:
                row["target_acc"] = evaluate(model, task.target_test, device=device)
            history.append(row)
    model.eval()
    target_acc = history[-1]["target_acc"] if history else zero_shot
    source_acc = evaluate(model, task.source_test, device=device)
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
        model=model if keep_model else None, amp=amp,
    )
