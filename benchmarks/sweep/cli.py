"""The rank sweep's command line: its options, and the checked :class:`SweepPlan` they become
(grid, settings, output folders, executor), refused in one line before anything runs.
:mod:`benchmarks.sweep.runner` runs the plan.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_OUT, REFERENCE_DIR, default_plots_dir
from benchmarks.sweep.executor import EXECUTORS, RAY_MISSING
from benchmarks.sweep.grid import (
    ALL_TASKS,
    BN_POLICIES,
    DEFAULT_METHODS,
    PRESETS,
    Config,
    SweepSettings,
    expand_grid,
    parse_dataset,
)
from convpeft.cli_args import blocks_list, csv_list, int_list
from convpeft.core.amp import AMP_MODES, check_amp
from convpeft.core.layer_kinds import TARGETS
from convpeft.methods import list_methods
from convpeft.models import TESTED_MODELS, list_models
from convpeft.train import MEMORY_FORMATS
from convpeft.train.schedule import SCHEDULES


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
    seeds = int_list(s)
    if not seeds or any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"--seeds {s!r}: seeds must be integers >= 0")
    return seeds


def _lr_grid(s: str) -> tuple[float, ...]:
    if s.strip().lower() == "off":
        return ()
    try:
        out = tuple(float(x) for x in csv_list(s))
    except ValueError:
        out = ()
    if not out or any(m <= 0 for m in out):
        raise argparse.ArgumentTypeError(f"expected positive multipliers like '1,3,10' or "
                                         f"'off', got {s!r}")
    return out


def _steps(s: str) -> tuple[int | None, dict[str, int]]:
    """``"48"`` -> (48, {}); ``"48,new_classes=96"`` -> (48, {"new_classes": 96})."""
    default, per_task = None, {}
    try:
        for part in csv_list(s):
            if "=" in part:
                task, n = (x.strip() for x in part.split("=", 1))
                if task not in ALL_TASKS:
                    raise ValueError
                per_task[task] = int(n)
            elif default is None:
                default = int(part)
            else:
                raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected steps like '48' or '48,new_classes=96' (TASK=N for {', '.join(ALL_TASKS)}),"
            f" got {s!r}") from None
    if default is None and not per_task:
        raise argparse.ArgumentTypeError(f"expected steps like '48', got {s!r}")
    return default, per_task


def _source_seed(s: str) -> int | str:
    if s.strip().lower() == "each":
        return "each"
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed (int) or 'each', got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rank_sweep",
        description="Rank sweep: fine-tune and profile every (model, task, method, rank, seed) "
        "of a grid; write results (CSV + JSONL), plots and a findings summary. Flags override "
        "the chosen --preset. Everything goes under --out (results/, ignored by git). The "
        "default grid took 23 min on an idle 2-core CPU from an empty cache (its time depends "
        "on the cores and their load); --seeds 1 fine-tunes a fifth as much, --profile-only "
        "trains nothing. "
        "Source models "
        "are cached in $CONVPEFT_CACHE (default ~/.cache/convpeft; about 0.11 GB for the "
        "default grid).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="base grid: 'default' = offline digits grid for a laptop CPU; 'paper' = "
                   "the study's grid (MobileNetV2/V3, ResNet18/34/50; CIFAR-10 -> CIFAR-10-C "
                   "shift and CIFAR-100 new classes; ranks 1..64; needs --data-root); 'study' "
                   "= the study's cost setup, to reproduce and correct its FLOP/memory claims: "
                   "full/LoRA/DoRA on MobileNetV2, MobileNetV3-small, ResNet18, adapters on "
                   "standard (groups=1) convs only, batch 32 x 224x224, ImageNet stem, ranks "
                   "1..64, one seed, cost only (implies --profile-only; offline: digits images "
                   "feed the profiled batch). Accuracy with the study's adapters: --preset "
                   "default --target standard. 'budget' = fine-tuning under a memory budget: "
                   "head / full FT / LoRA r=4 training every layer or only the last 1, 2, 4 or "
                   "8 blocks (frozen prefix in 8 chunks), default tasks, 5 seeds")
    g.add_argument("--models", type=csv_list, default=None,
                   help="comma-separated torchvision model names, e.g. mobilenet_v2,resnet18 "
                   "(preset's list if omitted)")
    g.add_argument("--methods", type=csv_list, default=None,
                   help=f"comma-separated methods from {','.join(list_methods())} "
                   f"(default grid: {','.join(DEFAULT_METHODS)})")
    g.add_argument("--ranks", type=int_list, default=None,
                   help="comma-separated ranks for the low-rank methods (lora, dora, galore); "
                   "full/head/bitfit run once per model/task/seed")
    g.add_argument("--update-blocks", type=blocks_list, default=None,
                   help="comma-separated grid axis: 'all' (every block trains, the default) "
                   "and/or K (only the last K backbone blocks train, the frozen prefix runs "
                   "without a graph; convpeft.memory.sparse), e.g. 'all,2,4'; recorded in the "
                   "update_blocks column and the row key. K=0 (the whole backbone frozen) "
                   "runs for head only, K>0 for every other method")
    g.add_argument("--tasks", type=csv_list, default=None,
                   help=f"comma-separated tasks from {','.join(ALL_TASKS)}: shift = clean -> "
                   "corrupted images; new_classes = learn held-out classes")
    g.add_argument("--seeds", type=_seeds, default=None,
                   help="N (the first N seeds, 0..N-1) or a comma-separated list of seeds, e.g. "
                   "'0,1,2' ('7,' = seed 7 alone). A seed draws the few-shot sample, the "
                   "adapters' init and the training order (with --source-seed each also the "
                   "data split and the source model); accuracies are reported as means with "
                   "95%% t-intervals over the seeds, which needs at least 2 (preset's seeds "
                   "if omitted)")
    g.add_argument("--target", choices=TARGETS, default=None,
                   help="layers the adapters (and GaLore) take, recorded in the target column "
                   "and the row key: conv = every conv (the 'default' and 'paper' presets); "
                   "standard = groups=1 convs only, what peft accepts (the 'study' preset); "
                   "see convpeft.core.layer_kinds for the other kinds (preset's if omitted)")
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
    t.add_argument("--steps", type=_steps, default=None,
                   help="optimizer steps per fine-tuning, whatever the task's size (the fewest "
                   "whole epochs that take at least that many; overrides --epochs), with "
                   "TASK=N for another count on some tasks, e.g. '48,new_classes=96' (a task "
                   "without one trains --epochs epochs when no plain N is given; default: the "
                   "preset's, 48,new_classes=96 for 'default' and 'budget')")
    t.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule: cosine = linear warm-up over the first 10%% of "
                   "the steps, then a half cosine to zero (convpeft.train.schedule); default: "
                   "the preset's (cosine, except 'paper': constant)")
    t.add_argument("--lr-grid", type=_lr_grid, default=None,
                   help="multipliers of each method's default rate tried on the validation "
                   "split at the first seed and the middle rank, e.g. '1,3,10'; the best one "
                   "trains every seed and rank of that method (benchmarks.sweep.lr_choice); "
                   "'off' = each method's default rate; ignored with --lr (default: the "
                   "preset's, 0.3,1,3,10 for 'default' and 'budget')")
    t.add_argument("--val-per-class", type=int, default=None,
                   help="validation images per class for --lr-grid, taken from the target "
                   "training images the few-shot sample left out (never test images; "
                   "default: the preset's, 20)")
    t.add_argument("--source-seed", type=_source_seed, default=None,
                   help="N = one source model and data split (seed N) shared by every seed, "
                   "the seeds drawing the few-shot sample, init and order, so the interval is "
                   "that of fine-tuning a given model; 'each' = every seed pretrains its own "
                   "(default: the preset's, 0 for 'default' and 'budget')")
    t.add_argument("--check-convergence", action="store_true",
                   help="after the sweep, rerun its grid with twice the steps (same seeds, "
                   "each method at its chosen rate) into OUT/steps_x2 and write "
                   "OUT/convergence.csv; findings.md then says which configurations' means "
                   "left their 95%% interval (benchmarks.sweep.convergence; doubles the time)")
    t.add_argument("--memory-format", choices=MEMORY_FORMATS, default=None,
                   help="layout of the fine-tuned model: auto = channels-last on the CPU for "
                   "nets with depthwise convs, whose NCHW weight gradients oneDNN computes "
                   "slowly on small maps (MobileNetV2 trains 1.3-2x faster; same results up to "
                   "float rounding), else contiguous (default: the preset's, auto for "
                   "'default' and 'budget', else contiguous)")
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
                   help="keep the ImageNet stem (by default the stem is adapted to small images; "
                   "the 'study' preset keeps it, at 224x224)")
    t.add_argument("--lean", action="store_true",
                   help="memory-lean activations (convpeft.lean_activations; exact): frozen "
                   "convs/BN and ReLU-like activations save only what backward needs")
    t.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="mixed precision of fine-tuning and of the profiled update "
                   "(torch.autocast; fp32 master weights; fp16 needs CUDA and gets a "
                   "GradScaler), recorded in the amp column (default: off = fp32)")
    t.add_argument("--no-precise-bn", action="store_true",
                   help="evaluate with the BN running averages collected while training; by "
                   "default BN statistics are recomputed for the final weights on the target "
                   "training data first (convpeft.train.recalibrate_bn; short runs leave the "
                   "running averages lagging the weights), recorded in the precise_bn column")
    t.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing of each backbone block (exact; one extra "
                   "forward of the blocks per update), recorded in the checkpoint column")
    t.add_argument("--prefix-chunks", type=int, default=None,
                   help="rows with --update-blocks K: run the frozen prefix in N micro-batches "
                   "(exact; lowers the peak), recorded in the prefix_chunks column (default: "
                   "the preset's, 1 except 'budget': 8)")
    t.add_argument("--prefix-stats", choices=("source", "target"), default=None,
                   help="rows with --update-blocks K: the frozen prefix's BN statistics, the "
                   "source model's or re-estimated on the target training data before the first "
                   "step (AdaBN of the prefix), recorded in the prefix_stats column (default: "
                   "the preset's, source except 'budget': target)")
    t.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    c = p.add_argument_group(
        "cost at the deployment size",
        "every cost a row, a figure and findings.md report is taken at this size on --device, "
        "not at the proxy's training size (--batch-size x --resolution, accuracy only): the "
        "torchvision model with its ImageNet stem, prepared as the row trains it")
    c.add_argument("--cost-at", default=None, metavar="BxR",
                   help="deployment size as BATCHxRESOLUTION, e.g. 64x224 (default: "
                   "--cost-batch x --cost-resolution)")
    c.add_argument("--cost-batch", type=int, default=None,
                   help="batch of the deployment size (default 64)")
    c.add_argument("--cost-resolution", type=int, default=None,
                   help="image side of the deployment size in pixels (default 224)")
    c.add_argument("--measure-cost", action="store_true",
                   help="measure each configuration's device peak (CPU allocator trace, or "
                   "CUDA max_memory_reserved with max_memory_allocated beside it) and update "
                   "time (median of 3 updates, CUDA events on a GPU; also as a ratio to full "
                   "FT measured in the same run) in a fresh process, instead of predicting the "
                   "peak from shapes (seconds per configuration); at 64x224 a configuration "
                   "takes up to a few GiB and a minute or more on a 2-core CPU")
    c.add_argument("--budget", default=None,
                   help="memory budget, e.g. 512MiB or 2GB: each row also records the largest "
                   "batch at the deployment resolution whose predicted device peak fits "
                   "(cost_max_batch, convpeft.planner)")
    x = p.add_argument_group("execution")
    x.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="sequential = one configuration after another in this process; "
                   "processes = a pool of --workers processes on this machine (one thread "
                   "each by default: the offline grid's small models leave a second core idle "
                   "otherwise; the 'default' and 'budget' presets' choice on a CPU, sequential "
                   "with --measure-cost or a GPU); ray = "
                   "each configuration as a Ray task, the source model pretrained once per "
                   "(model, dataset, task, seed) by one task and shared through Ray's object "
                   "store; this process alone writes the rows, identical to a sequential "
                   "run's but for the timing columns (needs pip install -e \".[ray]\")")
    x.add_argument("--workers", type=int, default=None,
                   help="with --executor processes: worker processes (default: the torch "
                   "thread count, at most 4), each with threads / workers intra-op threads")
    x.add_argument("--address", default=None,
                   help="with --executor ray: the Ray cluster to connect to (e.g. 'auto' on a "
                   "node of a running cluster, or HEAD_IP:6379); default: start a local "
                   "Ray on this machine's CPUs/GPUs and stop it afterwards")
    x.add_argument("--cpus-per-task", type=float, default=1,
                   help="with --executor ray: CPUs each task reserves (its torch thread count "
                   "stays this process's, as in a sequential run, so the rows match)")
    x.add_argument("--gpus-per-task", type=float, default=1,
                   help="with --executor ray and a cuda --device: GPUs each task reserves (a "
                   "fraction such as 0.5 shares a GPU between tasks)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=DEFAULT_OUT,
                   help="results folder (results.jsonl, results.csv, findings.md); reruns resume")
    o.add_argument("--plots", default=None,
                   help="folder for the figures and a copy of findings.md (default: OUT/plots, "
                   f"under the results folder; the committed {REFERENCE_DIR}/ are redrawn only by "
                   "python -m benchmarks.plot --reference)")
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
    executor: str = "sequential"  # benchmarks.sweep.executor.EXECUTORS
    address: str | None = None  # Ray cluster (None: a local Ray)
    cpus_per_task: float = 1
    gpus_per_task: float = 1
    workers: int = 1  # --executor processes


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
    cost_batch, cost_resolution = _cost_size(a)
    budget = None
    if a.budget is not None:
        from convpeft.planner import parse_budget

        budget = parse_budget(a.budget)  # ValueError naming the units
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
        small_input=not a.no_small_input and pre.extra.get("small_input", True),
        data_root=a.data_root,
        few_shot=a.few_shot if a.few_shot is not None else pre.extra.get("few_shot"),
        test_per_class=a.test_per_class if a.test_per_class is not None
        else pre.extra.get("test_per_class"),
        replay_per_class=a.replay_per_class,
        profile_only=a.profile_only or pre.extra.get("profile_only", False),
        profile_repeat=a.profile_repeat,
        device=device,
        lean=a.lean,
        amp=a.amp,
        checkpoint=a.checkpoint,
        precise_bn=not a.no_precise_bn,
        prefix_chunks=(a.prefix_chunks if a.prefix_chunks is not None
                       else pre.extra.get("prefix_chunks", 1)),
        prefix_stats=(a.prefix_stats if a.prefix_stats is not None
                      else pre.extra.get("prefix_stats", "source")),
        target=a.target if a.target is not None else pre.target,
        cost_batch=cost_batch,
        cost_resolution=cost_resolution,
        measure_cost=a.measure_cost,
        budget=budget,
        **_protocol(a, pre, ranks, seeds),
    )
    if settings.prefix_chunks < 1:
        raise ValueError("--prefix-chunks must be >= 1")
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
    plots = None if a.no_plots else (Path(a.plots) if a.plots else default_plots_dir(a.out))
    formats = csv_list(a.formats)
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
    # a pool only where it pays: training on the CPU (a profile-only run is seconds per row,
    # and its step times are better measured alone)
    executor = a.executor or (pre.executor if settings.device == "cpu" and not
                              settings.measure_cost and not settings.profile_only
                              else "sequential")
    workers = a.workers if a.workers is not None else min(4, torch.get_num_threads())
    if executor == "processes" and settings.measure_cost:
        raise ValueError("--measure-cost times one update per configuration: run it with "
                         "--executor sequential (a second worker would disturb the timing)")
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    _check_executor(a)
    grid = expand_grid(models, tasks, methods, ranks, seeds,
                       a.update_blocks if a.update_blocks is not None else pre.update_blocks)
    settings = _check_sparse_axes(a, grid, methods, settings)
    return SweepPlan(grid, settings, Path(a.out),
                     plots, formats, executor, a.address, a.cpus_per_task, a.gpus_per_task,
                     workers)


def _protocol(a: argparse.Namespace, pre, ranks: list[int], seeds: list[int]) -> dict:
    """The fine-tuning protocol's settings: flags over the preset's (``Preset.protocol``)."""
    p = pre.protocol
    if a.steps is not None:
        steps, task_steps = a.steps
    elif a.epochs is not None:
        steps, task_steps = None, {}
    else:
        steps, task_steps = p.get("steps"), dict(p.get("task_steps", {}))
    grid = a.lr_grid if a.lr_grid is not None else tuple(p.get("lr_grid", ()))
    val = a.val_per_class if a.val_per_class is not None else p.get("val_per_class", 0)
    src = a.source_seed if a.source_seed is not None else p.get("source_seed", "each")
    if any(n is not None and n < 1 for n in (steps, *task_steps.values())):
        raise ValueError("--steps must be >= 1")
    if val < 0:
        raise ValueError("--val-per-class must be >= 0")
    if grid and a.lr is None and not val:
        raise ValueError("--lr-grid chooses on a validation split: give --val-per-class N "
                         "(or --lr-grid off)")
    ranked = sorted(ranks)
    return dict(steps=steps, task_steps=task_steps,
                schedule=a.schedule or p.get("schedule", "constant"),
                lr_grid=grid if a.lr is None else (), lr_tune_seed=seeds[0],
                lr_tune_rank=ranked[(len(ranked) - 1) // 2] if ranked else None,
                val_per_class=val, test_unused=bool(p.get("test_unused", False)),
                source_seed=None if src == "each" else int(src),
                memory_format=a.memory_format or p.get("memory_format", "contiguous"))


def _check_sparse_axes(a: argparse.Namespace, grid: list, methods: list[str],
                       settings: SweepSettings) -> SweepSettings:
    """Refuse a method that --update-blocks leaves without a row (K=0 is head only), and the
    sparse-only flags where no row is sparse (unused, yet they would change every row's key, so
    an identical earlier run would no longer resume). A preset's sparse defaults are dropped
    there instead, for the same reason."""
    empty = [m for m in methods if not any(c.method == m for c in grid)]
    if empty:
        raise ValueError(f"--update-blocks gives method(s) {', '.join(empty)} no row: K=0 "
                         "(every block frozen) runs for head only, K >= 1 for every other "
                         "method; add 'all' or a K each of them takes to --update-blocks, or "
                         "drop them from --methods")
    if any(c.update_blocks is not None for c in grid):
        return settings
    given = [f for f, v in (("--prefix-chunks", a.prefix_chunks),
                            ("--prefix-stats", a.prefix_stats)) if v is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} apply to sparse rows only, and no row has "
                         "--update-blocks K; add e.g. --update-blocks all,4 or drop "
                         f"{' and '.join(given)}")
    return replace(settings, prefix_chunks=1, prefix_stats="source")


def _cost_size(a: argparse.Namespace) -> tuple[int, int]:
    """(batch, resolution) of the deployment size from --cost-at / --cost-batch /
    --cost-resolution (benchmarks.sweep.cost's defaults where unset)."""
    from benchmarks.sweep.cost import DEFAULT_COST_BATCH, DEFAULT_COST_RESOLUTION, parse_cost_at

    if a.cost_at is not None:
        if a.cost_batch is not None or a.cost_resolution is not None:
            raise ValueError("--cost-at BxR sets both --cost-batch and --cost-resolution: give "
                             "either --cost-at or those two")
        return parse_cost_at(a.cost_at)
    b = a.cost_batch if a.cost_batch is not None else DEFAULT_COST_BATCH
    r = a.cost_resolution if a.cost_resolution is not None else DEFAULT_COST_RESOLUTION
    return parse_cost_at(f"{b}x{r}")


def _check_executor(a: argparse.Namespace) -> None:
    if a.executor != "ray":
        if a.address is not None:
            raise ValueError("--address names a Ray cluster: it needs --executor ray")
        return
    if a.cpus_per_task <= 0 or a.gpus_per_task <= 0:
        raise ValueError("--cpus-per-task and --gpus-per-task must be > 0")
    if not _ray_installed():
        raise ValueError(RAY_MISSING)


def _ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


