"""The rank sweep's grid: presets, one configuration per run, and the grid expansion.

A *configuration* is one (model, task, method, rank, seed) run. Ranks only mean something for
the methods registered with ``ranked=True`` (LoRA, LoRA-FA, DoRA, GaLore:
``convpeft.methods.list_methods(ranked=True)``); the others (full fine-tuning, head-only, BitFit)
run once per (model, task, seed) with ``rank=None``. ``update_blocks`` (``--update-blocks``) is
an optional axis: ``None`` trains what the method trains everywhere (the default grid), ``K``
only the last K blocks (:mod:`convpeft.memory.sparse`; K=0, the whole backbone frozen and
graph-free, is head only's alone: every method trains just the head there). It is a row column
and, when set, part of the row key and of the configuration's label (``lora-r4-K2``).

The *settings* (dataset, corruption, epochs, batch size, adapter target, ...) are shared by
every configuration of a sweep. They are part of each result row's resume key, so rerunning
into the same output folder with different settings does not silently reuse rows computed
under the old ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from convpeft.data.tasks import TASKS as ALL_TASKS
from convpeft.methods import BN_POLICIES, MethodConfig, get_method, list_methods
from convpeft.models import TESTED_MODELS

__all__ = ["ALL_TASKS", "BN_POLICIES", "DEFAULT_METHODS", "PRESETS", "Config", "Preset",
           "SweepSettings", "expand_grid", "parse_dataset"]

DEFAULT_METHODS: tuple[str, ...] = ("full", "head", "bitfit", "lora", "dora", "galore")
"""The presets' methods (a choice of registered methods; LoRA-FA runs when asked for)."""


@dataclass(frozen=True)
class SweepSettings:
    """Everything shared by all configurations of one sweep (recorded in every row).

    ``dataset`` maps each task to its dataset: the paper grid adapts CIFAR-10 to CIFAR-10-C
    (shift) and CIFAR-100 to held-out classes (new_classes).
    """

    dataset: dict[str, str]
    corruption: str | None = None  # None: the task's documented default corruption
    severity: int | None = None  # None: the task's default severity
    epochs: int = 1
    pretrain_epochs: int | None = None  # None: convpeft.train's pretraining default
    pretrain_batch_size: int | None = None  # None: convpeft.train's pretraining default
    batch_size: int = 32
    resolution: int = 32
    bn: str = "train"
    lr: float | None = None  # None: each method's default learning rate
    small_input: bool = True
    data_root: str | None = None
    few_shot: int | None = None  # target-train images per class (None: all)
    test_per_class: int | None = None  # cap on test images per class (None: all)
    replay_per_class: int = 0  # new_classes: old-class images per class mixed into the target
    profile_only: bool = False
    profile_repeat: int = 3
    device: str = "cpu"
    lean: bool = False  # convpeft.lean_activations on every prepared model
    amp: str = "off"  # convpeft.core.amp: fine-tuning and the profiled update under autocast
    checkpoint: bool = False  # convpeft.checkpoint_blocks on every prepared model
    prefix_chunks: int = 1  # sparse rows (update_blocks set): micro-batches of the frozen prefix
    # sparse rows: the frozen prefix's BN statistics, the source model's or re-estimated on
    # the target data before training (MethodConfig.prefix_stats)
    prefix_stats: str = "source"
    # the layers the adapters (and GaLore) take, a convpeft.core.layer_kinds target: "conv" (every
    # conv, ours) or "standard" (groups == 1 convs only, the study's: peft refuses depthwise)
    target: str = "conv"
    # BN statistics recomputed for the final weights before evaluating (convpeft.train's
    # precise_bn); off: evaluate with the running averages collected while training
    precise_bn: bool = True
    # where costs are taken (benchmarks.sweep.cost): the deployment size, not the proxy's
    # training size above; predicted from shapes, or measured on the device (--measure-cost);
    # with a budget (bytes) the largest batch that fits. They change no training number, so
    # they are not in the signature: a resumed sweep recosts its rows instead of retraining
    cost_batch: int = 64
    cost_resolution: int = 224
    measure_cost: bool = False
    budget: int | None = None
    # the fine-tuning protocol (benchmarks.sweep.lr_choice, docs in README "The protocol"):
    # steps: optimizer steps per fine-tuning whatever the task's size (None: `epochs` epochs),
    # task_steps: another count for some tasks (new_classes learns new features: more steps);
    # schedule/warmup: convpeft.train.schedule; lr_grid: multipliers of each method's default
    # rate tried on the validation split (() = no tuning), at lr_tune_seed and, for ranked
    # methods, lr_tune_rank; val_per_class: that split's size; test_unused: new_classes tests
    # on every target-class image no split took; source_seed: one source model and data split
    # for every seed (None: each seed pretrains its own)
    steps: int | None = None
    task_steps: dict[str, int] = field(default_factory=dict)  # per task, instead of `steps`
    schedule: str = "constant"
    warmup: float = 0.1
    lr_grid: tuple[float, ...] = ()
    lr_tune_seed: int = 0
    lr_tune_rank: int | None = None
    val_per_class: int = 0
    test_unused: bool = False
    source_seed: int | None = None
    # the layout fine-tuning trains in (convpeft.train.resolve_memory_format): "auto" =
    # channels-last on the CPU for nets with depthwise convs (a speed choice, same results up to
    # float rounding)
    memory_format: str = "contiguous"

    def dataset_for(self, task: str) -> str:
        return self.dataset[task]

    def steps_for(self, task: str) -> int | None:
        """Fine-tuning steps of ``task``'s configurations (None: ``epochs`` epochs)."""
        return self.task_steps.get(task, self.steps)

    def signature(self) -> str:
        """Short hash of the settings that change a row's training numbers (not data_root,
        device, nor where costs are taken)."""
        d = asdict(self)
        for k in ("data_root", "device", "cost_batch", "cost_resolution", "measure_cost",
                  "budget"):
            d.pop(k)
        # off: keys of earlier results stay valid
        for k in ("replay_per_class", "lean", "checkpoint"):
            if not d[k]:
                d.pop(k)
        if d["prefix_chunks"] == 1:  # likewise
            d.pop("prefix_chunks")
        if d["prefix_stats"] == "source":  # likewise
            d.pop("prefix_stats")
        if d["amp"] == "off":  # likewise
            d.pop("amp")
        if d["target"] == "conv":  # likewise
            d.pop("target")
        if not d["precise_bn"]:  # likewise: rows from before precise BN keep their keys
            d.pop("precise_bn")
        # the protocol's fields, when off: keys of rows from before the protocol stay valid
        if d["schedule"] == "constant":
            d.pop("schedule"), d.pop("warmup")
        if not d["lr_grid"]:
            d.pop("lr_grid"), d.pop("lr_tune_seed"), d.pop("lr_tune_rank")
        for k in ("steps", "source_seed"):
            if d[k] is None:
                d.pop(k)
        if not d["task_steps"]:
            d.pop("task_steps")
        for k in ("val_per_class", "test_unused"):
            if not d[k]:
                d.pop(k)
        if d["memory_format"] == "contiguous":
            d.pop("memory_format")
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True, order=True)
class Config:
    """One run of the sweep. ``rank`` is None for methods without a rank; ``update_blocks``
    None unless only the last K blocks train."""

    model: str
    task: str
    method: str
    rank: int | None
    seed: int
    update_blocks: int | None = None

    @property
    def label(self) -> str:
        """Readable one-word label, e.g. ``lora-r4``, ``full`` or ``lora-r4-K2``."""
        label = f"{self.method}-r{self.rank}" if self.rank is not None else self.method
        return label if self.update_blocks is None else f"{label}-K{self.update_blocks}"

    def key(self, settings: SweepSettings) -> str:
        """Resume key: identifies a row across reruns (same settings => same key); rows
        without ``update_blocks`` keep the key they had before that axis existed."""
        rank = "-" if self.rank is None else str(self.rank)
        ds = settings.dataset_for(self.task)
        sparse = [] if self.update_blocks is None else [f"K{self.update_blocks}"]
        return "|".join(
            [self.model, ds, self.task, self.method, rank, str(self.seed), settings.signature(),
             *sparse]
        )


def expand_grid(
    models: list[str],
    tasks: list[str],
    methods: list[str],
    ranks: list[int],
    seeds: list[int],
    update_blocks: list[int | None] | None = None,
) -> list[Config]:
    """All configurations, grouped by (model, task, seed) so each source model is built once.

    Within a group the order is the methods' order, ranked methods expanded over ``ranks``,
    then each over ``update_blocks`` (None: every block, K: the last K; default ``[None]``;
    K=0 runs for head only, K>0 for every other method). Duplicates in any list are dropped
    (first occurrence wins).
    """
    models, tasks, methods = _unique(models), _unique(tasks), _unique(methods)
    ranks, seeds = _unique(ranks), _unique(seeds)
    ks = _unique(list(update_blocks)) if update_blocks is not None else [None]
    bad = [k for k in ks if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                                                or k < 0)]
    if bad or not ks:
        raise ValueError(f"--update-blocks takes 'all' and ints >= 0 (got {bad or 'nothing'})")
    ranked = [m for m in methods if get_method(m).ranked]
    if not ranks and ranked:
        raise ValueError(f"--ranks is empty but ranked method(s) {', '.join(ranked)} were "
                         f"requested (ranked: {', '.join(list_methods(ranked=True))})")
    out: list[Config] = []
    for model in models:
        for task in tasks:
            for seed in seeds:
                for method in methods:
                    rs = ranks if method in ranked else [None]
                    out.extend(Config(model, task, method, r, seed, k) for r in rs for k in ks
                               if k is None or (k == 0) == (method == "head"))
    return out


def _unique(xs: list) -> list:
    seen: set = set()
    return [x for x in xs if not (x in seen or seen.add(x))]


@dataclass(frozen=True)
class Preset:
    """A named grid + settings; CLI flags override single fields."""

    models: list[str]
    tasks: list[str]
    methods: list[str]
    ranks: list[int]
    seeds: list[int]
    dataset: dict[str, str]
    epochs: int
    batch_size: int
    resolution: int
    extra: dict = field(default_factory=dict)
    target: str = "conv"  # the adapters' layers (SweepSettings.target); --target overrides
    update_blocks: list = field(default_factory=lambda: [None])  # --update-blocks overrides
    # the fine-tuning protocol (SweepSettings' steps, schedule, lr_grid, val_per_class,
    # test_unused, source_seed); flags override each
    protocol: dict = field(default_factory=dict)
    # where the configurations run on a CPU unless --executor says (benchmarks.sweep.executor)
    executor: str = "sequential"


_PROTOCOL = {"steps": 48, "task_steps": {"new_classes": 96}, "schedule": "cosine",
             "lr_grid": (0.3, 1.0, 3.0, 10.0), "val_per_class": 20,
             "test_unused": True, "source_seed": 0,
             "memory_format": "auto"}
"""The offline presets' fine-tuning protocol (SweepSettings' fields of the same names)."""


def _offline(*, methods: list[str], ranks: list[int], extra: dict | None = None,
             update_blocks: list | None = None) -> Preset:
    """A preset on the offline digits tasks with the protocol (the default and budget grids
    share all of it but their methods, ranks and sparse axis)."""
    return Preset(
        models=["mobilenet_v2", "resnet18"], tasks=["shift", "new_classes"], methods=methods,
        ranks=ranks, seeds=[0, 1, 2, 3, 4],
        dataset={"shift": "digits", "new_classes": "digits"}, epochs=2, batch_size=16,
        resolution=12,
        extra={"few_shot": 20, "corruption": "contrast", "severity": 3,
               "pretrain_batch_size": 32, "pretrain_epochs": 6, **(extra or {})},
        update_blocks=update_blocks or [None], protocol=dict(_PROTOCOL), executor="processes")


PRESETS: dict[str, Preset] = {
    # The offline default (docs/rank-sweep.md, "The protocol"): one source model per (model,
    # task), pretrained once (seed 0, cached) and adapted by 5 seeds, each drawing its own
    # 20-shot target sample, init and order. Every fine-tuning takes 48 optimizer steps at
    # batch 16 (96 for new_classes, which learns new features: at 48 its means still moved up
    # 5-11 points with twice the steps) with warm-up + cosine, at the rate chosen on a
    # validation split (20 images per class the sample left out) from 0.3x/1x/3x/10x the
    # method's default. Tests use every held-out image: the whole test split, and for
    # new_classes also the target classes' training images no split took. --check-convergence
    # measures whether the steps are enough (plots/rank_sweep_default_convergence.csv).
    # Digits at 12x12 (the 8x8 originals lose nothing); MobileNetV2 needs 6 pretraining epochs
    # there (83% clean accuracy; 2 gave 31-49%), ResNet18 is at 99% after them. Contrast at
    # severity 3 is a real shift for both nets.
    "default": _offline(methods=list(DEFAULT_METHODS), ranks=[1, 4, 16]),
    # The study's grid (needs CIFAR-10, CIFAR-10-C and CIFAR-100 under --data-root).
    "paper": Preset(
        models=list(TESTED_MODELS),
        tasks=["shift", "new_classes"],
        methods=list(DEFAULT_METHODS),
        ranks=[1, 2, 4, 8, 16, 32, 64],
        seeds=[0, 1, 2],
        dataset={"shift": "cifar10", "new_classes": "cifar100"},
        epochs=10,
        batch_size=64,
        resolution=32,
    ),
    # The study's own setup, to reproduce its cost claims and correct them (findings.md, "The
    # study's claims, reproduced and corrected"): adapters on the groups=1 convs only (peft
    # refuses depthwise ranks not divisible by the channel count, so that is what a peft-based
    # study can adapt), MobileNetV2/V3-small and ResNet18 with the ImageNet stem at 224x224,
    # batch 32, the paper grid's ranks. Cost only (profile_only: one update per configuration,
    # no training); the digits images, upsampled, only feed the profiled batch, so it runs
    # offline. Seeds do not change a cost: one seed. Rerun with --target conv (adapters on every
    # conv) and --lean into the same --out to get every column of the comparison.
    "study": Preset(
        models=["mobilenet_v2", "mobilenet_v3_small", "resnet18"],
        tasks=["shift"],
        methods=["full", "lora", "dora"],
        ranks=[1, 2, 4, 8, 16, 32, 64],
        seeds=[0],
        dataset={"shift": "digits", "new_classes": "digits"},
        epochs=0,
        batch_size=32,
        resolution=224,
        extra={"profile_only": True, "small_input": False, "corruption": "contrast",
               "severity": 3},
        target="standard",
    ),
    # Fine-tuning under a memory budget: sparse updates (only the last K blocks train, the
    # frozen prefix without a graph, in 8 micro-batches) against LoRA on every conv, full
    # fine-tuning and head only, on the default tasks and data, 5 seeds for paired intervals.
    # Full FT of the last K blocks is the classic "fine-tune the top layers" baseline. The
    # memory these configurations need at a realistic size is benchmarks.sparse_memory's.
    "budget": _offline(methods=["head", "full", "lora"], ranks=[4],
                       extra={"prefix_chunks": 8, "prefix_stats": "target"},
                       update_blocks=[None, 1, 2, 4, 8]),
}


def parse_dataset(spec: str, tasks: list[str]) -> dict[str, str]:
    """``"digits"`` -> every task on digits; ``"shift=cifar10,new_classes=cifar100"`` -> per task.

    Raises ValueError when a requested task has no dataset.
    """
    spec = spec.strip()
    if "=" not in spec:
        return {t: spec for t in tasks}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--dataset: expected TASK=NAME pairs, got {part!r} in {spec!r}")
        task, name = (s.strip() for s in part.split("=", 1))
        mapping[task] = name
    missing = [t for t in tasks if t not in mapping]
    if missing:
        raise ValueError(f"--dataset {spec!r} names no dataset for task(s) {missing}")
    return mapping


def method_config(cfg: Config, settings: SweepSettings):
    """The :class:`convpeft.methods.MethodConfig` of ``cfg`` (method defaults where unset)."""
    kw: dict = {"rank": cfg.rank} if cfg.rank is not None else {}
    if settings.bn is not None:
        kw["bn"] = settings.bn
    if settings.lr is not None:
        kw["lr"] = settings.lr
    if cfg.update_blocks is not None:
        kw.update(update_blocks=cfg.update_blocks, prefix_chunks=settings.prefix_chunks,
                  prefix_stats=settings.prefix_stats)
    return MethodConfig(cfg.method, lean=settings.lean, checkpoint=settings.checkpoint,
                        target=settings.target, **kw)
