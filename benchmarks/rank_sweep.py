"""The rank sweep: backbones x tasks x methods x ranks, each run measured for cost and accuracy.

    python -m benchmarks.rank_sweep                 # offline default grid (digits, 3 seeds)
    python -m benchmarks.rank_sweep --profile-only  # cost of every update, no training, ~1-2 min
    python -m benchmarks.rank_sweep --preset paper --data-root ~/data   # the study's grid

For every configuration (model, task, method, rank, seed) the sweep

1. builds the task and the *source* model once per (model, task, seed): pretrained on the source
   split and cached by :func:`convpeft.train.pretrain` (random init under ``--profile-only``);
2. prepares a copy with the method (adapters, frozen parameters, optimizer) and fine-tunes it on
   the target split, measuring zero-shot / target / source accuracy;
3. profiles ONE update at ``--batch-size`` with :func:`convpeft.profiler.profile_update`
   (FLOPs split by pass, true peak memory by category, time; torch's FlopCounterMode figure) —
   once per configuration, not per seed: what an update costs depends on shapes only, so the
   other seeds' rows copy the profile columns (``profile_seed`` says which seed measured them;
   a resumed sweep reuses a profile already on disk);
4. saves the trainable tensors with safetensors to measure the adapter's size on disk;

and appends one row per (configuration, seed) to ``--out``/results.{jsonl,csv}; a rerun resumes
per seed. ``results_summary.csv`` folds the seeds: accuracies as mean and 95% t-interval per
configuration (:mod:`benchmarks.stats`). A configuration that raises (including out-of-memory)
is recorded with ``status="failed"`` and its error, and the sweep goes on. Ctrl-C stops after
writing what is finished; rerunning the same command resumes (finished keys are skipped). At
the end the plots (``--plots``, intervals as error bars) and the findings (``findings.md``:
methods ranked only where their intervals separate) are written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.results import (
    JSONL_NAME,
    ResultsStore,
    dedupe,
    environment_metadata,
    flatten,
    locked,
    read_jsonl,
)
from benchmarks.sweep_grid import (
    ALL_TASKS,
    BN_POLICIES,
    DEFAULT_METHODS,
    PRESETS,
    Config,
    SweepSettings,
    expand_grid,
    parse_dataset,
)
from convpeft.amp import AMP_MODES, check_amp
from convpeft.methods import list_methods
from convpeft.models import TESTED_MODELS, list_models

DEFAULT_OUT = "results/rank_sweep"
DEFAULT_PLOTS = "plots"


# ----------------------------------------------------------------------------- CLI


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in _csv_list(s)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _seeds(s: str) -> list[int]:
    """``--seeds``: ``"N"`` = the first N seeds (0..N-1); a comma-separated list = exactly those
    seeds (``"7,"`` is seed 7 alone)."""
    if "," not in s:
        try:
            n = int(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"expected a number of seeds N or a comma-separated list, got {s!r}") from e
        if n < 1:
            raise argparse.ArgumentTypeError(
                f"--seeds {s}: the number of seeds must be >= 1 (one given seed k: '{s},')")
        return list(range(n))
    seeds = _int_list(s)
    if not seeds or any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"--seeds {s!r}: seeds must be integers >= 0")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rank_sweep",
        description="Rank sweep: fine-tune and profile every (model, task, method, rank, seed) "
        "of a grid; write results (CSV + JSONL), plots and a findings summary. Flags override "
        "the chosen --preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="base grid: 'default' = offline digits grid for a laptop CPU; 'paper' = "
                   "the study's grid (MobileNetV2/V3, ResNet18/34/50; CIFAR-10 -> CIFAR-10-C "
                   "shift and CIFAR-100 new classes; ranks 1..64; needs --data-root)")
    g.add_argument("--models", type=_csv_list, default=None,
                   help="comma-separated torchvision model names, e.g. mobilenet_v2,resnet18 "
                   "(preset's list if omitted)")
    g.add_argument("--methods", type=_csv_list, default=None,
                   help=f"comma-separated methods from {','.join(list_methods())} "
                   f"(default grid: {','.join(DEFAULT_METHODS)})")
    g.add_argument("--ranks", type=_int_list, default=None,
                   help="comma-separated ranks for the low-rank methods (lora, dora, galore); "
                   "full/head/bitfit run once per model/task/seed")
    g.add_argument("--tasks", type=_csv_list, default=None,
                   help=f"comma-separated tasks from {','.join(ALL_TASKS)}: shift = clean -> "
                   "corrupted images; new_classes = learn held-out classes")
    g.add_argument("--seeds", type=_seeds, default=None,
                   help="N (the first N seeds, 0..N-1) or a comma-separated list of seeds, e.g. "
                   "'0,1,2' ('7,' = seed 7 alone). A seed draws the data split, the source "
                   "model's pretraining, init and training order; accuracies are reported as "
                   "means with 95%% t-intervals over the seeds, which needs at least 2 "
                   "(preset's seeds if omitted)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="dataset for every task (digits, cifar10, cifar100, ...), or per task "
                   "as 'shift=cifar10,new_classes=cifar100'")
    d.add_argument("--data-root", default=None,
                   help="folder with the CIFAR / CIFAR-10-C files (never downloaded here)")
    d.add_argument("--corruption", default=None,
                   help="corruption of the shift task (see convpeft.data.list_corruptions()); "
                   "default: the task's documented default")
    d.add_argument("--severity", type=int, default=None,
                   help="corruption severity 1..5 (default: the task's default)")
    d.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels the data is resized to")
    d.add_argument("--few-shot", type=int, default=None,
                   help="keep N target-training images per class (smaller = faster)")
    d.add_argument("--test-per-class", type=int, default=None,
                   help="evaluate on at most N test images per class (a stratified subset, "
                   "fixed by the seed; smaller = faster, noisier accuracies)")
    d.add_argument("--replay-per-class", type=int, default=0,
                   help="new_classes: mix N source-class training images per old class into the "
                   "adaptation data, so the old classes are not simply forgotten (default: 0)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per configuration")
    t.add_argument("--pretrain-epochs", type=int, default=None,
                   help="epochs of source pretraining (cached; default: convpeft.train's)")
    t.add_argument("--pretrain-batch-size", type=int, default=None,
                   help="batch size of source pretraining (default: convpeft.train's)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="batch size of fine-tuning AND of the profiled update")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate for every method (default: each method's own default)")
    t.add_argument("--bn", choices=BN_POLICIES, default=None,
                   help="batch-norm policy: train = update stats + affine; freeze = eval-mode BN; "
                   "stats = adapt running stats only (default: convpeft.methods' default)")
    t.add_argument("--no-small-input", action="store_true",
                   help="keep the ImageNet stem (by default the stem is adapted to small images)")
    t.add_argument("--lean", action="store_true",
                   help="memory-lean activations (convpeft.lean_activations; exact): frozen "
                   "convs/BN and ReLU-like activations save only what backward needs")
    t.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="mixed precision of fine-tuning and of the profiled update "
                   "(torch.autocast; fp32 master weights; fp16 needs CUDA and gets a "
                   "GradScaler), recorded in the amp column (default: off = fp32)")
    t.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing of each backbone block (exact; one extra "
                   "forward of the blocks per update), recorded in the checkpoint column")
    t.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=DEFAULT_OUT,
                   help="results folder (results.jsonl, results.csv, findings.md); reruns resume")
    o.add_argument("--plots", default=DEFAULT_PLOTS, help="folder for the figures")
    o.add_argument("--no-plots", action="store_true", help="skip drawing the figures")
    o.add_argument("--formats", default="png,svg", help="figure formats")
    o.add_argument("--profile-only", action="store_true",
                   help="measure the cost of one update per configuration without pretraining "
                   "or fine-tuning (no accuracies)")
    o.add_argument("--profile-repeat", type=int, default=2,
                   help="timed updates per profile (median time reported)")
    o.add_argument("--dry-run", action="store_true",
                   help="print the configurations that would run and exit")
    return p


@dataclass
class SweepPlan:
    configs: list[Config]
    settings: SweepSettings
    out: Path
    plots: Path | None
    formats: list[str]


def _figure_formats() -> set[str]:
    """File formats matplotlib can save (png, svg, pdf, ...)."""
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def _check_writable_dir(path: Path, flag: str, fix: str = "pass a folder you can write") -> None:
    """Refuse, before any configuration runs, a folder that cannot hold the outputs: a path
    that is a file (or under one), or a folder this process cannot write into. Leaves nothing
    behind: the nearest existing ancestor is what is checked, by creating and removing a
    probe file in it (``os.access`` alone says yes to root on a read-only mount)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a file, not a folder; {fix}")
    why = None
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "permission denied"
    else:
        try:
            fd, tmp = tempfile.mkstemp(dir=probe, prefix=".convpeft-write-probe-")
        except OSError as e:
            why = e.strerror or type(e).__name__
        else:
            os.close(fd)
            os.unlink(tmp)
    if why is not None:
        raise ValueError(f"{flag} {path}: {probe} is not writable ({why}); {fix}")


def plan_from_args(a: argparse.Namespace) -> SweepPlan:
    """Merge the preset with the flags; validate what can be validated before running."""
    pre = PRESETS[a.preset]
    models = a.models if a.models is not None else pre.models
    methods = a.methods if a.methods is not None else pre.methods
    ranks = a.ranks if a.ranks is not None else pre.ranks
    tasks = a.tasks if a.tasks is not None else pre.tasks
    seeds = a.seeds if a.seeds is not None else pre.seeds
    bad = [m for m in methods if m not in list_methods()]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(list_methods())}")
    bad = [t for t in tasks if t not in ALL_TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {', '.join(ALL_TASKS)}")
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if not models or not methods or not tasks or not seeds:
        raise ValueError("--models, --methods, --tasks and --seeds must each name at least one")
    if a.severity is not None and not 1 <= a.severity <= 5:
        raise ValueError(f"--severity must be in 1..5, got {a.severity}")
    dataset = parse_dataset(a.dataset, tasks) if a.dataset else {t: pre.dataset[t] for t in tasks}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = SweepSettings(
        dataset=dataset,
        corruption=a.corruption if a.corruption is not None else pre.extra.get("corruption"),
        severity=a.severity if a.severity is not None else pre.extra.get("severity"),
        epochs=a.epochs if a.epochs is not None else pre.epochs,
        pretrain_epochs=a.pretrain_epochs if a.pretrain_epochs is not None
        else pre.extra.get("pretrain_epochs"),
        pretrain_batch_size=a.pretrain_batch_size if a.pretrain_batch_size is not None
        else pre.extra.get("pretrain_batch_size"),
        batch_size=a.batch_size if a.batch_size is not None else pre.batch_size,
        resolution=a.resolution if a.resolution is not None else pre.resolution,
        bn=a.bn,
        lr=a.lr,
        small_input=not a.no_small_input,
        data_root=a.data_root,
        few_shot=a.few_shot if a.few_shot is not None else pre.extra.get("few_shot"),
        test_per_class=a.test_per_class if a.test_per_class is not None
        else pre.extra.get("test_per_class"),
        replay_per_class=a.replay_per_class,
        profile_only=a.profile_only,
        profile_repeat=a.profile_repeat,
        device=device,
        lean=a.lean,
        amp=a.amp,
        checkpoint=a.checkpoint,
    )
    check_amp(settings.amp, settings.device)  # fp16 on the CPU: refused before anything runs
    if settings.epochs < 0 or settings.batch_size < 1 or settings.resolution < 8:
        raise ValueError("--epochs must be >= 0, --batch-size >= 1, --resolution >= 8")
    if (settings.few_shot is not None and settings.few_shot < 1) or (
            settings.test_per_class is not None and settings.test_per_class < 1):
        raise ValueError("--few-shot and --test-per-class must be >= 1")
    if settings.replay_per_class < 0:
        raise ValueError("--replay-per-class must be >= 0")
    unknown = [m for m in models if m not in set(list_models())]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: use torchvision classification models, "
                         f"e.g. {', '.join(TESTED_MODELS)} (all: convpeft.models.list_models())")
    plots = None if a.no_plots else Path(a.plots)
    formats = _csv_list(a.formats)
    if plots is not None:
        supported = _figure_formats()
        bad = [f for f in formats if f not in supported]
        if bad or not formats:
            raise ValueError(f"unknown --formats {bad or a.formats!r}; choose from "
                             f"{', '.join(sorted(supported))}")
    _check_writable_dir(Path(a.out), "--out")
    if plots is not None:
        _check_writable_dir(plots, "--plots")
    if not settings.profile_only:  # source models are pretrained once and cached there
        from convpeft.train import resolve_cache_dir

        _check_writable_dir(resolve_cache_dir(), "pretrain cache",
                            "set $CONVPEFT_CACHE to a folder you can write")
    return SweepPlan(expand_grid(models, tasks, methods, ranks, seeds), settings, Path(a.out),
                     plots, formats)


# ----------------------------------------------------------------------------- one config


def _cap_per_class(ds, n: int, seed: int):
    """At most ``n`` images per class of ``ds`` (stratified, deterministic for ``seed``)."""
    from convpeft.data import stratified_indices

    counts = ds.labels.bincount()
    k = min(n, int(counts[counts > 0].min()))
    if k >= int(counts.max()):
        return ds
    idx, _ = stratified_indices(ds.labels, per_class=k, seed=seed)
    return ds.subset(idx)


class SourceCache:
    """Per (dataset, task, seed): the task data; per (model, dataset, task, seed): the source
    model — each built once and shared by all methods/ranks of that group. A group whose
    construction failed remembers the error, so its configurations fail fast with it."""

    def __init__(self, settings: SweepSettings):
        self.s = settings
        self._tasks: dict[tuple, object] = {}
        self._sources: dict[tuple, object] = {}
        # (model, dataset, task, seed) -> zero-shot (target, source) accuracy of the source model
        self.zero_shot: dict[tuple, tuple[float, float]] = {}
        # (model, dataset, task, method, rank) -> the profile columns of that configuration,
        # measured at one seed and copied into the rows of the others (see profile_columns)
        self.profiles: dict[tuple, dict] = {}

    def profile_key(self, cfg: Config) -> tuple:
        """What one update's cost depends on within a sweep: everything but the seed."""
        return (cfg.model, self.s.dataset_for(cfg.task), cfg.task, cfg.method, cfg.rank)

    def reuse_profiles(self, rows: Sequence[dict], keys: set[str]) -> int:
        """Remember the profile columns of the ``ok`` rows whose key is in ``keys`` (this
        sweep's grid, so the same settings), so a resumed sweep profiles no configuration
        twice. Returns how many configurations that covers."""
        for r in rows:
            if r.get("status") == "ok" and r.get("key") in keys:
                pk = (r["model"], r["dataset"], r["task"], r["method"], r.get("rank"))
                self.profiles.setdefault(pk, profile_columns(r))
        return len(self.profiles)

    def task(self, cfg: Config):
        from convpeft.data import build_task

        key = (self.s.dataset_for(cfg.task), cfg.task, cfg.seed)
        if key not in self._tasks:
            try:
                self._tasks[key] = build_task(
                    cfg.task,
                    self.s.dataset_for(cfg.task),
                    corruption=self.s.corruption if cfg.task == "shift" else None,
                    severity=self.s.severity if cfg.task == "shift" else None,
                    data_root=self.s.data_root,
                    seed=cfg.seed,
                    resolution=self.s.resolution,
                    few_shot=self.s.few_shot,
                    **({"replay_per_class": self.s.replay_per_class}
                       if cfg.task == "new_classes" else {}),
                )
                if self.s.test_per_class is not None:
                    t = self._tasks[key]
                    t.target_test = _cap_per_class(t.target_test, self.s.test_per_class, cfg.seed)
                    t.source_test = _cap_per_class(t.source_test, self.s.test_per_class, cfg.seed)
            except Exception as e:  # remembered: every config of the group fails with it
                self._tasks[key] = e
        t = self._tasks[key]
        if isinstance(t, Exception):
            raise t
        return t

    def _source_key(self, cfg: Config) -> tuple:
        return (cfg.model, self.s.dataset_for(cfg.task), cfg.task, cfg.seed)

    def has_source(self, cfg: Config) -> bool:
        return self._source_key(cfg) in self._sources

    def source(self, cfg: Config):
        """(source model on the CPU, extra row fields) for ``cfg``'s group."""
        key = self._source_key(cfg)
        if key not in self._sources:
            try:
                self._sources[key] = self._build_source(cfg)
            except Exception as e:
                self._sources[key] = e
        src = self._sources[key]
        if isinstance(src, Exception):
            raise src
        return src

    def _build_source(self, cfg: Config):
        from convpeft.layer_kinds import layer_kind
        from convpeft.models import build_model

        task = self.task(cfg)
        t0, c0 = time.perf_counter(), time.process_time()
        if self.s.profile_only:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, task.source_num_classes, small_input=self.s.small_input)
        else:
            from convpeft.train import pretrain

            kw = {}
            if self.s.pretrain_epochs is not None:
                kw["epochs"] = self.s.pretrain_epochs
            if self.s.pretrain_batch_size is not None:
                kw["batch_size"] = self.s.pretrain_batch_size
            model = pretrain(cfg.model, task.dataset, task=task, seed=cfg.seed,
                             small_input=self.s.small_input, resolution=self.s.resolution,
                             data_root=self.s.data_root, device=self.s.device, progress=False,
                             **kw)
        kinds = [layer_kind(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        pinfo = getattr(model, "pretrain_info", {}) or {}
        info = {
            "source_time_s": time.perf_counter() - t0,
            "source_cpu_time_s": time.process_time() - c0,
            "source_cached": pinfo.get("cached"),
            "source_test_acc": pinfo.get("source_test_acc"),
            # equal across machines exactly when the source weights are bit-identical
            "source_weights_sha256": pinfo.get("weights_sha256"),
            "n_convs": len(kinds),
            "n_depthwise_convs": sum(k == "depthwise" for k in kinds),
        }
        return model.cpu(), info


_PROFILE_EXTRA = ("profile_time_s", "profile_seed", "trainable_params", "total_params",
                  "adapter_bytes", "bn_stats_bytes", "galore_projected_weights",
                  "galore_fallback_weights", "galore_plain_adamw")


def profile_columns(row: dict) -> dict:
    """The columns of ``row`` that one profiled update determines (FLOPs, memory, step time,
    parameter counts, adapter size on disk; the flattened :class:`UpdateProfile` fields and
    their nested ``memory_by_category_*``-style children): the same for every seed of a
    configuration. ``profile_seed`` defaults to the row's seed for rows written before it
    existed."""
    from convpeft.profiler import UpdateProfile

    names = [f.name for f in dataclasses.fields(UpdateProfile)]
    out = {k: v for k, v in row.items()
           if k in _PROFILE_EXTRA or any(k == f or k.startswith(f + "_") for f in names)}
    out.setdefault("profile_seed", row.get("seed"))
    return out


def _trainable_bytes(model: torch.nn.Module, bn_policy: str | None) -> tuple[int, int]:
    """(bytes of a safetensors file of the trainable tensors, bytes of the BN running stats file
    when the BN policy changes them). The first is what a device must receive to apply the
    update besides the unchanged base model."""
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad}
    stats = {}
    if bn_policy in ("train", "stats"):
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for bn in ("running_mean", "running_var"):
                    t = getattr(m, bn)
                    if t is not None:
                        stats[f"{n}.{bn}"] = t.detach().cpu().contiguous()
    sizes = []
    with tempfile.TemporaryDirectory() as d:
        for name, tensors in (("adapter", trainable), ("bn", stats)):
            if not tensors:
                sizes.append(0)
                continue
            path = Path(d) / f"{name}.safetensors"
            save_file(tensors, str(path))
            sizes.append(path.stat().st_size)
    return sizes[0], sizes[1]


def method_config(cfg: Config, settings: SweepSettings):
    """The :class:`convpeft.methods.MethodConfig` of ``cfg`` (method defaults where unset)."""
    from convpeft.methods import MethodConfig

    kw: dict = {"rank": cfg.rank} if cfg.rank is not None else {}
    if settings.bn is not None:
        kw["bn"] = settings.bn
    if settings.lr is not None:
        kw["lr"] = settings.lr
    return MethodConfig(cfg.method, lean=settings.lean, checkpoint=settings.checkpoint, **kw)


def run_config(cfg: Config, settings: SweepSettings, sources: SourceCache) -> dict:
    """Run one configuration; returns its result fields (raises on failure).

    The profiled update runs on its own freshly prepared copy of the source model: what one
    update costs does not depend on the weights' values, and this way the profiler's extra
    optimizer steps can never leak into the fine-tuned model whose accuracy is reported. For
    the same reason it runs once per configuration: a later seed copies the profile columns
    from ``sources.profiles`` (``profile_seed`` names the seed that measured them).
    """
    dev = torch.device(settings.device)
    task = sources.task(cfg)
    source, info = sources.source(cfg)
    row: dict = dict(info)
    row.update(n_target_train=len(task.target_train), n_target_test=len(task.target_test),
               n_source_test=len(task.source_test), corruption=task.corruption,
               severity=task.severity)
    mcfg = method_config(cfg, settings)
    row["bn"], row["lr"] = mcfg.bn, mcfg.resolved_lr

    # --- cost of one update at the training batch size, on real target images: once per
    # configuration (the first seed that gets here), copied into the rows of the other seeds
    pkey = sources.profile_key(cfg)
    if pkey not in sources.profiles:
        sources.profiles[pkey] = _profile(cfg, settings, source, task, mcfg, dev)
    row.update(sources.profiles[pkey])

    # --- accuracy: fine-tune a fresh copy of the source model (finetune copies it)
    if not settings.profile_only:
        from convpeft.train import finetune

        # Same global RNG state for every method of a group: the new-class head rows and the
        # adapters are drawn from it, so zero-shot accuracy is identical across the group.
        torch.manual_seed(cfg.seed)
        # The zero-shot baseline depends on (source model, task, seed) only: evaluate it once
        # per group and hand it to the group's other methods.
        zs_key = sources._source_key(cfg)
        res = finetune(source, mcfg, task, epochs=settings.epochs,
                       batch_size=settings.batch_size, seed=cfg.seed, device=dev,
                       progress=False, copy_model=True, eval_every_epoch=False,
                       keep_model=True, zero_shot=sources.zero_shot.get(zs_key),
                       amp=settings.amp)
        sources.zero_shot[zs_key] = (res.zero_shot_acc, res.zero_shot_source_acc)
        for k in ("zero_shot_acc", "zero_shot_source_acc", "target_acc", "source_acc",
                  "forgetting", "recovered_fraction", "train_time_s"):
            row[k] = getattr(res, k, None)
        if res.history:
            row["final_train_loss"] = res.history[-1].get("loss")
        if res.model is not None:
            row["adapter_bytes"], row["bn_stats_bytes"] = _trainable_bytes(res.model, mcfg.bn)
    return row


def _profile(cfg: Config, settings: SweepSettings, source: torch.nn.Module, task, mcfg,
             dev: torch.device) -> dict:
    """Profile one update of ``cfg`` on a prepared copy of ``source``: the row's profile
    columns (:func:`profile_columns`), the adapter size on disk included."""
    from convpeft.methods import prepare
    from convpeft.models import expand_head
    from convpeft.profiler import profile_update

    model = copy.deepcopy(source)
    if task.num_new_classes:
        expand_head(model, task.num_new_classes)
    model.to(dev)
    torch.manual_seed(cfg.seed)
    prepared = prepare(model, mcfg)
    x, y = next(task.target_train.batches(settings.batch_size, shuffle=False, device=dev))
    prepared.train_mode()  # the BN policy decides what the update saves/updates
    t0 = time.perf_counter()
    prof = profile_update(prepared.model, prepared.optimizer, x, y,
                          warmup=1, repeat=settings.profile_repeat, amp=settings.amp)
    out: dict = {"profile_time_s": time.perf_counter() - t0, "profile_seed": cfg.seed}
    out.update(flatten(prof.to_dict()))
    out["trainable_params"] = int(prepared.trainable_params)
    out["total_params"] = int(sum(p.numel() for p in prepared.model.parameters()))
    if hasattr(prepared.report, "fallback"):  # GaLore: weights whose rank made it plain AdamW
        n_proj, n_fb = len(prepared.report.projected), len(prepared.report.fallback)
        out["galore_projected_weights"], out["galore_fallback_weights"] = n_proj, n_fb
        # rank >= the smaller side of every targeted weight: this row is plain AdamW
        out["galore_plain_adamw"] = n_proj == 0 and n_fb > 0
    # the size of what a device must receive: shapes only, like the rest of the profile
    out["adapter_bytes"], out["bn_stats_bytes"] = _trainable_bytes(prepared.model, mcfg.bn)
    del model, prepared
    return out


# ----------------------------------------------------------------------------- the sweep


def _base_row(cfg: Config, s: SweepSettings, env: dict) -> dict:
    return {
        "key": cfg.key(s),
        "model": cfg.model,
        "dataset": s.dataset_for(cfg.task),
        "task": cfg.task,
        "method": cfg.method,
        "rank": cfg.rank,
        "seed": cfg.seed,
        "corruption": s.corruption if cfg.task == "shift" else None,
        "severity": s.severity if cfg.task == "shift" else None,
        "epochs": 0 if s.profile_only else s.epochs,
        "batch_size": s.batch_size,
        "resolution": s.resolution,
        "few_shot": s.few_shot,
        "test_per_class": s.test_per_class,
        "replay_per_class": s.replay_per_class if cfg.task == "new_classes" else None,
        "small_input": s.small_input,
        "lean": s.lean,
        "amp": s.amp,
        "checkpoint": s.checkpoint,
        "mode": "profile-only" if s.profile_only else "train",
        "settings_signature": s.signature(),
        # present in every row (None under --profile-only or on failure): a uniform table
        "zero_shot_acc": None,
        "target_acc": None,
        "source_acc": None,
        **env,
    }


def _fmt_flops(v) -> str:
    if v is None:
        return "?"
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if v >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.3g} FLOP"


def summary_line(row: dict) -> str:
    """One concise line per finished configuration."""
    rank = "" if row.get("rank") is None else f"-r{row['rank']}"
    head = f"{row['model']} {row['task']} {row['method']}{rank} s{row['seed']}"
    if row.get("status") != "ok":
        return f"FAILED {head}: {row.get('error', '')[:160]}"
    parts = [head]
    if row.get("target_acc") is not None:
        zs = row.get("zero_shot_acc")
        zs = f" (zero-shot {100 * zs:.1f}%)" if zs is not None else ""
        parts.append(f"acc {100 * row['target_acc']:.1f}%{zs}")
    parts.append(f"{_fmt_flops(row.get('flops_total'))}/update")
    if row.get("memory_peak") is not None:
        parts.append(f"peak {row['memory_peak'] / 2**20:.1f} MiB")
    parts.append(f"{row.get('trainable_params', 0):,} trainable")
    if row.get("galore_fallback_weights"):
        n_fb = row["galore_fallback_weights"]
        n_all = n_fb + (row.get("galore_projected_weights") or 0)
        what = "all" if row.get("galore_plain_adamw") else f"{n_fb} of {n_all}"
        parts.append(f"GaLore: {what} weights plain AdamW (rank >= smaller side)")
    parts.append(f"{row.get('wall_time_s', 0):.1f} s")
    return " | ".join(parts)


def run_sweep(plan: SweepPlan, *, log=print) -> tuple[list[dict], bool]:
    """Run (or resume) the planned sweep. Returns (the rows of this grid, interrupted?)."""
    s = plan.settings
    store = ResultsStore(plan.out)
    done = store.done_keys()
    todo = [c for c in plan.configs if c.key(s) not in done]
    skipped = len(plan.configs) - len(todo)
    log(f"rank sweep: {len(plan.configs)} configurations ({skipped} already done, "
        f"{len(todo)} to run) -> {plan.out}")
    env = environment_metadata(s.device)
    sources = SourceCache(s)
    sources.reuse_profiles(store.rows, {c.key(s) for c in plan.configs})
    errlog = plan.out / "errors.log"
    interrupted = False
    bar = tqdm(total=len(todo), desc="configs", unit="cfg", dynamic_ncols=True,
               disable=not todo)
    try:
        for cfg in todo:
            row = _base_row(cfg, s, env)
            if sources.has_source(cfg) or s.profile_only:
                bar.set_postfix_str(f"{cfg.model} {cfg.task} {cfg.label}")
            else:  # the first config of a group pays for the source model (cached on disk)
                bar.set_postfix_str(f"{cfg.model} {cfg.task}: source model (pretrain or cache)")
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                row.update(run_config(cfg, s, sources))
                row["status"], row["error"] = "ok", None
            except Exception as e:  # isolate: record and go on (OOM included)
                row["status"] = "failed"
                row["error"] = f"{type(e).__name__}: {e}"[:1000]
                with errlog.open("a") as f:
                    f.write(f"== {row['key']}\n{traceback.format_exc()}\n")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            row["wall_time_s"] = time.perf_counter() - t0
            row["cpu_time_s"] = time.process_time() - c0  # all threads of this process
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            store.add(row)
            bar.write(summary_line(row))
            bar.update(1)
            gc.collect()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    keys = {c.key(s) for c in plan.configs}
    rows = [r for r in store.rows if r.get("key") in keys]
    if interrupted:
        log(f"interrupted: {len(rows)} of {len(plan.configs)} configurations are in "
            f"{store.csv_path} (valid); rerun the same command to resume")
    return rows, interrupted


def finish(plan: SweepPlan, rows: list[dict], *, log=print) -> str:
    """Plots + findings for the rows; returns the findings markdown. ``main`` passes every row
    of ``plan.out``'s JSONL (rows another sweep wrote there included), so findings.md always
    matches results.jsonl and results.csv."""
    from benchmarks.findings import findings_markdown

    if plan.plots is not None:
        from benchmarks.plot import make_plots

        files = make_plots(rows, plan.plots, plan.formats)
        log(f"{len(files)} plot files -> {plan.plots}")
    md = findings_markdown(rows)
    _write_atomic(plan.out / "findings.md", md + "\n")
    if plan.plots is not None:
        _write_atomic(plan.plots / "findings.md", md + "\n")
    return md


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _raise_keyboard_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        plan = plan_from_args(a)
    except ValueError as e:  # one line, exit 2 (argparse's usage block would bury it)
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if a.dry_run:
        for c in plan.configs:
            print(c.key(plan.settings))
        print(f"{len(plan.configs)} configurations")
        return 0
    t0 = time.perf_counter()
    # SIGINT and SIGTERM (Ctrl-C, kill, a job scheduler's timeout) stop the sweep alike: the
    # rows written so far stay valid and the "rerun to resume" message is printed. SIGINT gets
    # our own handler too, because a shell starts background jobs with SIGINT ignored and
    # Python then never installs its KeyboardInterrupt handler.
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _raise_keyboard_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        rows, interrupted = run_sweep(plan)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if interrupted:
        return 130
    # under the folder's lock: a sweep finishing beside this one cannot interleave a staler
    # findings.md, and the last one to finish writes every row of the JSONL
    with locked(plan.out):
        md = finish(plan, dedupe(read_jsonl(plan.out / JSONL_NAME)))
    print()
    print(md)
    n_fail = sum(r.get("status") != "ok" for r in rows)
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(rows)} rows ({n_fail} failed) -> "
          f"{plan.out / 'results.csv'}")
    if rows and n_fail == len(rows):
        print(f"every configuration failed; see {plan.out / 'errors.log'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
