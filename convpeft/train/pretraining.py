"""The source model: trained once per recipe, seed and machine kind, then loaded from the cache.

:func:`pretrain` trains on ``task.source_train`` with AdamW and a one-cycle schedule under
:func:`~convpeft.train.determinism.deterministic_torch`, inside a forked RNG so a cache hit and
a miss leave the caller's global RNG alike, then recalibrates the BatchNorm statistics on the
source data (:func:`recalibrate_bn`: after a short run the running averages still remember the
first steps). The weights go to the cache (:mod:`convpeft.train.cache`) atomically; an
unreadable entry is trained again and replaced, with a warning. Pretraining and its evaluation
stay fp32, so the cached weights do not depend on how they are later fine-tuned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings

import torch
from torch import nn

from ..data import Task, build_task
from ..models import build_model
from .batchnorm import recalibrate_bn
from .cache import (
    _backend,
    _cache_error,
    _check_cache_writable,
    _data_fingerprint,
    resolve_cache_dir,
)
from .determinism import deterministic_torch, state_dict_sha256
from .evaluation import evaluate
from .loop import _batches_per_epoch, _progress, _train_epoch, default_device

# Bump when the pretraining recipe changes, so stale cached weights are not reused.
# 2: deterministic algorithms, fixed thread count, forked RNG; key names torch/threads/backend;
#    BN running statistics recalibrated on the source data after the last epoch
_RECIPE_VERSION = 2
PRETRAIN_DEFAULTS = {"epochs": 5, "lr": 3e-3, "batch_size": 64, "weight_decay": 1e-4,
                     "augment_shift": 2, "threads": 2}
"""``threads``: intra-op threads during pretraining (a reduction split over another number of
threads sums in another order, so the thread count changes the weights); 2 fits a laptop and
CI, a bigger machine only pretrains a little slower than it could."""


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
