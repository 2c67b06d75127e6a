"""Adaptation tasks: a distribution shift, or classes the source model has never seen.

``build_task("shift", ...)``: the source model is trained on clean data; the target is the same
classes under a corruption (or a mix of corruptions) at a severity.
``target_acc`` = accuracy on the corrupted test split, ``source_acc`` = accuracy on the clean test
split after adaptation (its fall from the zero-shot value is the forgetting).

``build_task("new_classes", ...)``: the source model is trained on ``source_classes`` (relabelled
``0..k-1``); the target is ``target_classes`` (relabelled ``k..k+m-1``), learned with the head
expanded by ``m`` rows (:func:`convpeft.models.expand_head`). ``target_acc`` = accuracy on the new
classes' test images, ``source_acc`` = accuracy on the old classes' test images, both over the
full ``k+m``-way head.

The default shift on digits, ``DEFAULT_SHIFT = ("impulse_noise", 5)`` (salt-and-pepper on 7% of
the values), was chosen because it is a real shift there: the upsampled 8x8 digits are smooth,
so blur barely matters while sparse impulses do. Accuracies are measured, not quoted here: a
sweep (``benchmarks.rank_sweep``) records ``zero_shot_acc``/``target_acc``/``source_acc`` in
every result row and ``benchmarks.plot`` draws them (``accuracy_*`` plots).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .corruptions import check_severity, corrupt, get_corruption
from .datasets import ImageDataset, load_dataset, stratified_indices

__all__ = ["DEFAULT_SHIFT", "TASKS", "Task", "build_task"]

TASKS = ("shift", "new_classes")
DEFAULT_SHIFT: tuple[str, int] = ("impulse_noise", 5)


@dataclass
class Task:
    """Datasets and metadata of one adaptation task.

    ``source_num_classes``: outputs of the source model; ``num_classes``: outputs after
    adaptation (``source_num_classes + num_new_classes``). ``config()`` is the JSON-able
    description (also the pretraining cache key's task part).
    """

    kind: str
    dataset: str
    source_train: ImageDataset
    source_test: ImageDataset
    target_train: ImageDataset
    target_test: ImageDataset
    source_num_classes: int
    num_classes: int
    source_classes: list[int]
    target_classes: list[int]
    corruption: str | list[str] | None = None
    severity: int | None = None
    few_shot: int | None = None
    replay_per_class: int = 0
    seed: int = 0
    resolution: int = 32
    extra: dict = field(default_factory=dict)
    target_val: ImageDataset | None = None
    few_shot_seed: int | None = None
    test_unused: bool = False

    @property
    def num_new_classes(self) -> int:
        return self.num_classes - self.source_num_classes

    def source_config(self) -> dict:
        """What the source model depends on (its pretraining cache key)."""
        return {"dataset": self.dataset, "kind": self.kind, "seed": self.seed,
                "resolution": self.resolution, "source_classes": list(self.source_classes),
                "n_source_train": len(self.source_train)}

    def config(self) -> dict:
        return {
            "task": self.kind, "dataset": self.dataset, "corruption": self.corruption,
            "severity": self.severity, "few_shot": self.few_shot, "seed": self.seed,
            "resolution": self.resolution, "source_classes": list(self.source_classes),
            "target_classes": list(self.target_classes), "replay_per_class": self.replay_per_class,
            "source_num_classes": self.source_num_classes, "num_classes": self.num_classes,
            "n_target_train": len(self.target_train), "n_target_test": len(self.target_test),
            "n_source_train": len(self.source_train), "n_source_test": len(self.source_test),
            **({"few_shot_seed": self.few_shot_seed} if self.few_shot_seed is not None else {}),
            **({"n_target_val": len(self.target_val)} if self.target_val is not None else {}),
            **({"test_unused": True} if self.test_unused else {}),
        }


def _few_shot(ds: ImageDataset, n: int | None, seed: int, val_per_class: int = 0
              ) -> tuple[ImageDataset, ImageDataset | None, ImageDataset | None]:
    """(the ``n`` per class sample, ``val_per_class`` per class of what it left out or None,
    the rest or None): three disjoint parts of ``ds``."""
    if n is None:
        return ds, None, None
    if n < 1:
        raise ValueError(f"few_shot must be >= 1 samples per class (got {n})")
    idx, rest = stratified_indices(ds.labels, per_class=n, seed=seed)
    val = None
    if val_per_class:
        left = min(int((ds.labels[rest] == c).sum()) for c in ds.labels.unique().tolist())
        if val_per_class > left:
            raise ValueError(f"val_per_class={val_per_class} but the few-shot sample leaves only "
                             f"{left} target training images in some class; lower val_per_class "
                             "or few_shot")
        v, r = stratified_indices(ds.labels[rest], per_class=val_per_class, seed=seed + 7919)
        val, rest = ds.subset(rest[v]), rest[r]
    return ds.subset(idx), val, (ds.subset(rest) if len(rest) else None)


def _corrupted(ds: ImageDataset, corruption, severity: int, seed: int) -> ImageDataset:
    out = ImageDataset(corrupt(ds.images, corruption, severity, seed=seed), ds.labels.clone(),
                       list(ds.classes), ds.name, dict(ds.info))
    out.info.update(corruption=corruption, severity=severity, corruption_seed=seed)
    return out


def _select(ds: ImageDataset, classes: Sequence[int], offset: int) -> ImageDataset:
    """Images of ``classes`` relabelled ``offset + position in classes``."""
    lut = torch.full((max(int(ds.labels.max()) + 1, max(classes) + 1),), -1, dtype=torch.int64)
    lut[torch.as_tensor(list(classes))] = torch.arange(len(classes)) + offset
    keep = torch.nonzero(lut[ds.labels] >= 0).flatten()
    out = ds.subset(keep)
    out.labels = lut[out.labels]
    return out


def _check_split(classes: Sequence[int] | None, name: str, n: int) -> list[int]:
    cls = [int(c) for c in classes]  # type: ignore[union-attr]
    if not cls:
        raise ValueError(f"{name} is empty; give at least one class id in 0..{n - 1}")
    if len(set(cls)) != len(cls):
        raise ValueError(f"{name} repeats a class: {cls}")
    bad = [c for c in cls if not 0 <= c < n]
    if bad:
        raise ValueError(f"{name} has class ids {bad} outside 0..{n - 1}")
    return cls


def build_task(
    task: str = "shift",
    dataset: str = "digits",
    *,
    corruption: str | Sequence[str] | None = None,
    severity: int | None = None,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    resolution: int = 32,
    few_shot: int | None = None,
    source_classes: Sequence[int] | None = None,
    target_classes: Sequence[int] | None = None,
    replay_per_class: int = 0,
    download: bool = False,
    few_shot_seed: int | None = None,
    val_per_class: int = 0,
    test_unused: bool = False,
) -> Task:
    """Build a :class:`Task` (see the module docstring).

    shift: ``corruption`` (name or list = mix) and ``severity`` default to
    :data:`DEFAULT_SHIFT`. On cifar10 the target test split is CIFAR-10-C (official ``.npy``
    under ``data_root`` when present, else generated); every other target split is generated
    with :func:`convpeft.data.corrupt` (target train seeded ``seed + 1``, test ``seed + 2``).
    new_classes: ``source_classes`` default to the first half of the class ids,
    ``target_classes`` to the rest; they must be non-empty and disjoint.
    ``replay_per_class`` adds that many source-class training images per old class to the target
    training split (rehearsal; 0 = none). ``few_shot``: keep only n images per class of the
    target training split (sampled with ``few_shot_seed``, default ``seed``: another few-shot
    seed draws another sample from the same split and source data, so the source model stays
    the same). ``val_per_class`` (needs ``few_shot``): that many images per class of what the
    sample left out become ``task.target_val``, a validation split for choosing
    hyper-parameters (never the test images). ``test_unused`` (new_classes only): the target
    classes' training images that neither the sample nor the validation split took join
    ``target_test``: the source model never saw those classes, so they are as held out as
    the test split (for shift they are corrupted copies of the source training images, and
    it is refused).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0 (got {val_per_class})")
    if (val_per_class or test_unused) and few_shot is None:
        raise ValueError("val_per_class and test_unused take images the few-shot sample left "
                         "out; give few_shot as well")
    if test_unused and task != "new_classes":
        raise ValueError("test_unused is for task='new_classes': the shift task's unused target "
                         "training images are corrupted copies of the source model's training "
                         "images, not held out")
    fs_seed = seed if few_shot_seed is None else few_shot_seed
    kw = dict(data_root=data_root, resolution=resolution, seed=seed, download=download)
    train = load_dataset(dataset, split="train", **kw)
    test = load_dataset(dataset, split="test", **kw)
    n_cls = train.num_classes

    if task == "shift":
        if source_classes is not None or target_classes is not None:
            raise ValueError("source_classes/target_classes are for task='new_classes'")
        corruption = DEFAULT_SHIFT[0] if corruption is None else corruption
        severity = DEFAULT_SHIFT[1] if severity is None else severity
        check_severity(severity)
        names = [corruption] if isinstance(corruption, str) else list(corruption)
        if not names:
            raise ValueError("corruption list is empty")
        for nm in names:
            get_corruption(nm)
        corr = names[0] if len(names) == 1 else names
        target_train, val, _ = _few_shot(_corrupted(train, corr, severity, seed + 1), few_shot,
                                         fs_seed, val_per_class)
        if dataset == "cifar10" and isinstance(corr, str):
            target_test = load_dataset("cifar10c", split="test", corruption=corr,
                                       severity=severity, **kw)
        else:
            target_test = _corrupted(test, corr, severity, seed + 2)
        all_cls = list(range(n_cls))
        return Task("shift", dataset, train, test, target_train, target_test, n_cls, n_cls,
                    all_cls, all_cls, corr, severity, few_shot, 0, seed, resolution,
                    target_val=val, few_shot_seed=few_shot_seed)

    if corruption is not None or severity is not None:
        raise ValueError("corruption/severity are for task='shift'")
    src = list(range(n_cls // 2)) if source_classes is None else source_classes
    src = _check_split(src, "source_classes", n_cls)
    if target_classes is None:
        target_classes = [c for c in range(n_cls) if c not in set(src)]
    tgt = _check_split(target_classes, "target_classes", n_cls)
    overlap = sorted(set(src) & set(tgt))
    if overlap:
        raise ValueError(f"source_classes and target_classes overlap on {overlap}; they must be "
                         "disjoint")
    k = len(src)
    source_train, source_test = _select(train, src, 0), _select(test, src, 0)
    target_train, val, unused = _few_shot(_select(train, tgt, k), few_shot, fs_seed,
                                          val_per_class)
    if replay_per_class:
        idx, _ = stratified_indices(source_train.labels, per_class=replay_per_class, seed=fs_seed)
        rep = source_train.subset(idx)
        target_train = ImageDataset(torch.cat([target_train.images, rep.images]),
                                    torch.cat([target_train.labels, rep.labels]),
                                    target_train.classes, target_train.name)
    names = [train.classes[c] for c in src + tgt]
    for ds in (source_train, source_test, target_train):
        ds.classes = names[:k]
    target_test = _select(test, tgt, k)
    if test_unused and unused is not None:
        target_test = ImageDataset(torch.cat([target_test.images, unused.images]),
                                   torch.cat([target_test.labels, unused.labels]),
                                   target_test.classes, target_test.name, dict(target_test.info))
    for ds in (target_train, target_test, val):
        if ds is not None:
            ds.classes = names
    return Task("new_classes", dataset, source_train, source_test, target_train, target_test,
                k, k + len(tgt), src, tgt, None, None, few_shot, replay_per_class, seed, resolution,
                target_val=val, few_shot_seed=few_shot_seed, test_unused=test_unused)
