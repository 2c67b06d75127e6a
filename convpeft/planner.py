"""Will it fit? The largest batch whose training update fits a memory budget, per configuration.

:func:`plan` takes a model, an input resolution and a memory budget, and for every
configuration (method, rank, lean or not) finds the largest batch size whose update's peak
memory stays within the budget. Every figure comes from
:func:`convpeft.profiler.analytic_profile`: the update runs on meta tensors, so one evaluation
costs about one instrumented step of bookkeeping whatever the batch, needs no data, and works
for any model size. On CPU it predicts exactly what :func:`convpeft.profiler.profile_update`
measures (the tensor-level peak); on a GPU add what the tensor level cannot see (CUDA context,
allocator caching and fragmentation, cuDNN workspaces) as headroom.

Configurations follow the rank sweep's defaults (:mod:`convpeft.methods`): adapters or
GaLore projection on every conv, classifier trainable, BN in train mode, AdamW. ``bn``,
``optimizer`` and ``lean`` change them for every configuration; ``lean="both"`` plans each
configuration plain and with :func:`convpeft.lean_activations`. Models are built on the meta
device, so nothing is allocated for weights either.

The search (:func:`largest_fitting`) assumes the peak never falls as the batch grows (true of
every update: each per-sample tensor grows with the batch, the rest does not change). It
evaluates batch 1 (0 if even that does not fit; batch 2 where batch 1 cannot run, as with a
train-mode BatchNorm on a 1x1 feature map), then grows the batch until one does not fit
(secant extrapolation through the last two evaluations, at least doubling once a guess fell
short), then narrows the bracket with the secant through its ends, bisecting whenever that
does not halve it. The peak is affine in the batch once activations dominate, so this usually
needs 4-6 evaluations (O(log max_batch) at worst); each batch is evaluated once.
The answer is exact for the analytic model: the planned batch fits and the next one was
evaluated and does not (unless the search stopped at ``max_batch``: ``capped=True``).

Budgets (:func:`parse_budget`) are bytes, or a number with a unit: ``kB``/``MB``/``GB``/``TB``
are powers of 1000 and ``KiB``/``MiB``/``GiB``/``TiB`` (also ``Ki``/``Mi``/``Gi``/``Ti``) powers
of 1024; a bare ``K``/``M``/``G``/``T`` is the SI unit (``300M`` = 300 MB = 300,000,000 bytes,
as in Kubernetes). Units are case-insensitive (``mib`` = ``MiB``); bits are not supported.

The command line is :mod:`convpeft.plan` (``python -m convpeft.plan``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from convpeft.profiler import UpdateProfile

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_RANKS",
    "OPTIMIZERS",
    "PlanConfig",
    "PlanRow",
    "build_configured",
    "expand_configs",
    "format_bytes",
    "format_plan",
    "largest_fitting",
    "parse_budget",
    "plan",
    "plot_plan",
]

DEFAULT_RANKS: tuple[int, ...] = (1, 4, 16)
"""The rank sweep's default ranks."""
DEFAULT_MAX_BATCH = 4096
OPTIMIZERS: dict[str, str] = {
    "adamw": "AdamW (the methods' default; two state tensors per trainable parameter)",
    "adam": "Adam (same state as AdamW)",
    "sgd": "SGD without momentum (no optimizer state)",
    "sgdm": "SGD with momentum 0.9 (one state tensor per trainable parameter)",
}
LEAN_CHOICES = ("off", "on", "both")
_GALORE_OPTIMIZER = ("galore brings its own projected AdamW; use optimizer 'adamw' or drop galore "
                     "from the methods (got optimizer {!r})")

_UNIT_BYTES: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNIT_BYTES[_p] = _UNIT_BYTES[_p + "b"] = 1000**_i
    _UNIT_BYTES[_p + "i"] = _UNIT_BYTES[_p + "ib"] = 1024**_i
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNIT_HELP = ("use bytes, or a number with a unit: kB/MB/GB/TB (powers of 1000; K/M/G/T alone "
              "mean the same) or KiB/MiB/GiB/TiB (powers of 1024), e.g. 512MiB or 1.5GB")


def parse_budget(budget: str | int) -> int:
    """Bytes of a budget such as ``"512MiB"``, ``"1.5GB"``, ``"300M"``, ``"2GiB"`` or ``4096``.

    See the module docstring for the units; fractional bytes are dropped. ``ValueError``
    (saying what to write instead) for anything else or a budget below one byte.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ValueError(f"budget must be a string or an int number of bytes (got {budget!r})")
    if isinstance(budget, int):
        n = budget
    else:
        m = _BUDGET_RE.match(budget)
        if m is None:
            raise ValueError(f"cannot read budget {budget!r}; {_UNIT_HELP}")
        unit = m.group(2).lower()
        if unit not in _UNIT_BYTES:
            raise ValueError(f"budget {budget!r}: unknown unit {m.group(2)!r}; {_UNIT_HELP}")
        try:
            n = int(Decimal(m.group(1)) * _UNIT_BYTES[unit])
        except (InvalidOperation, OverflowError):
            raise ValueError(f"cannot read budget {budget!r}; {_UNIT_HELP}") from None
    if n < 1:
        raise ValueError(f"budget must be at least 1 byte (got {budget!r})")
    return n


def format_bytes(n: int) -> str:
    """``n`` bytes in MiB (GiB from 10 GiB on), e.g. ``"512.0 MiB"``."""
    return f"{n / 2**30:,.1f} GiB" if abs(n) >= 10 * 2**30 else f"{n / 2**20:,.1f} MiB"


# ----------------------------------------------------------------------------- search
def largest_fitting(peak: Callable[[int], int], budget: int, max_batch: int,
                    min_batch: int = 1) -> tuple[int, dict[int, int]]:
    """The largest ``n`` in ``min_batch..max_batch`` with ``peak(n) <= budget`` (0 if not even
    ``min_batch``), and every ``{n: peak(n)}`` evaluated. ``peak`` must be non-decreasing.

    Exact: unless the answer is 0 or ``max_batch``, ``answer + 1`` was evaluated and exceeds the
    budget. See the module docstring for the order of evaluations.
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"max_batch must be >= min_batch >= 1 (got max_batch {max_batch}, "
                         f"min_batch {min_batch})")
    seen: dict[int, int] = {}

    def f(n: int) -> int:
        if n not in seen:
            seen[n] = int(peak(n))
        return seen[n]

    if f(min_batch) > budget:
        return 0, seen
    lo, hi = min_batch, None  # invariant: f(lo) <= budget < f(hi)
    prev = None  # the fitting batch evaluated before lo (unbracketed growth)
    undershot = False
    while hi is None:
        if lo >= max_batch:
            return lo, seen
        if prev is None or f(lo) <= f(prev):
            # nothing to extrapolate from (or flat so far): the next batch, then doubling
            guess = lo + 1 if prev is None else 2 * lo
        else:
            # secant through (prev, lo), one past its last fitting batch
            guess = lo + (budget - f(lo)) * (lo - prev) // (f(lo) - f(prev)) + 1
        if undershot:
            guess = max(guess, 2 * lo)
        guess = min(max(guess, lo + 1), max_batch)
        if f(guess) <= budget:
            prev, lo, undershot = lo, guess, prev is not None
        else:
            hi = guess
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        if bisect:
            guess = (lo + hi) // 2
        else:  # the last batch the chord from lo to hi keeps within the budget
            guess = lo + (budget - f(lo)) * (hi - lo) // max(f(hi) - f(lo), 1)
            guess = min(max(guess, lo + 1), hi - 1)
        if f(guess) <= budget:
            lo = guess
        else:
            hi = guess
        bisect = not bisect and (hi - lo) * 2 > width
    return lo, seen


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class PlanConfig:
    """One planned configuration; ``rank`` is None for methods without one."""

    method: str
    rank: int | None
    lean: bool

    @property
    def label(self) -> str:
        """e.g. ``lora r4 lean`` or ``full``."""
        r = f" r{self.rank}" if self.rank is not None else ""
        return f"{self.method}{r}{' lean' if self.lean else ''}"


def _lean_options(lean: bool | str) -> tuple[bool, ...]:
    if isinstance(lean, bool):
        return (lean,)
    if lean not in LEAN_CHOICES:
        raise ValueError(f"lean must be True, False or one of {', '.join(LEAN_CHOICES)} "
                         f"(got {lean!r})")
    return {"off": (False,), "on": (True,), "both": (False, True)}[lean]


def expand_configs(methods: Sequence[str] | None = None,
                   ranks: Sequence[int] = DEFAULT_RANKS,
                   lean: bool | str = False, optimizer: str = "adamw") -> list[PlanConfig]:
    """Every (method, rank, lean) to plan: ranked methods once per rank, the others once;
    ``methods=None`` means every registered method (:func:`convpeft.methods.list_methods`),
    less galore when ``optimizer`` is not AdamW (galore brings its own). Duplicates are
    dropped. ``ValueError`` for an unknown method, a rank below 1, no rank for a ranked method,
    or galore asked for with another optimizer."""
    from convpeft.methods import get_method, list_methods

    default = methods is None
    methods = list(dict.fromkeys(list_methods() if default else methods))
    ranks = list(dict.fromkeys(ranks))
    if not methods:
        raise ValueError(f"no method to plan; name some of {', '.join(list_methods())}")
    for m in methods:
        get_method(m)
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"ranks must be integers >= 1 (got {bad})")
    if optimizer != "adamw" and "galore" in methods:
        if not default:
            raise ValueError(_GALORE_OPTIMIZER.format(optimizer))
        methods.remove("galore")
    ranked = [m for m in methods if get_method(m).ranked]
    if ranked and not ranks:
        raise ValueError(f"no rank given for the ranked method(s) {', '.join(ranked)}")
    out = []
    for le in _lean_options(lean):
        for m in methods:
            for r in (ranks if m in ranked else [None]):
                out.append(PlanConfig(m, r, le))
    return out


def build_configured(model: str | Callable[[], nn.Module], config: PlanConfig, *,
                     bn: str = "train", optimizer: str = "adamw", num_classes: int = 10,
                     small_input: bool = False, device: str | torch.device = "meta",
                     ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh ``model`` set up for ``config`` in training mode, and its optimizer.

    ``model`` is a torchvision name (:func:`convpeft.models.build_model`, random init) or a
    zero-argument callable returning a fresh ``nn.Module``; either is built under
    ``torch.device(device)`` (``"meta"``: no memory, for :func:`plan`; ``"cpu"`` to run it).
    The method comes from :func:`convpeft.methods.prepare`; ``optimizer`` other than
    ``"adamw"`` replaces the AdamW it builds by the same parameters and learning rate.
    """
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if optimizer != "adamw" and config.method == "galore":
        raise ValueError(_GALORE_OPTIMIZER.format(optimizer))
    kw: dict[str, Any] = {"rank": config.rank} if config.rank is not None else {}
    cfg = MethodConfig(config.method, bn=bn, lean=config.lean, **kw)
    with torch.device(device):
        net = (build_model(model, num_classes, small_input=small_input) if isinstance(model, str)
               else model())
    if not isinstance(net, nn.Module):
        raise ValueError(f"the model factory must return an nn.Module (got {type(net).__name__})")
    prep = prepare(net, cfg)
    prep.train_mode()
    opt = prep.optimizer
    if optimizer != "adamw":
        params = [p for p in net.parameters() if p.requires_grad]
        lr = cfg.resolved_lr
        opt = {"adam": lambda: torch.optim.Adam(params, lr=lr),
               "sgd": lambda: torch.optim.SGD(params, lr=lr),
               "sgdm": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9)}[optimizer]()
    return net, opt


# ----------------------------------------------------------------------------- rows
@dataclass
class PlanRow:
    """What one configuration can do under the budget.

    ``max_batch``: the largest batch whose update fits (0: not even ``min_batch``; None when a
    fixed ``batch`` was asked about instead). ``min_batch``: the smallest batch the update runs
    at: 1, or 2 where a train-mode BatchNorm would see one value per channel at batch 1 (a 1x1
    feature map; torch refuses that). ``batch``: the batch every figure below is at -- the max
    batch, the asked batch, or ``min_batch`` when nothing fits. ``fits``: the update at
    ``batch`` fits.
    ``capped``: the search stopped at ``max_batch`` (larger batches may fit too).
    ``memory_peak`` / ``memory_by_category``: predicted peak bytes of one update and what is
    live at that moment (params, buffers, grads, optimizer, activations, temporaries);
    ``headroom = budget - memory_peak``. ``flops_update``: FLOPs of the whole update at
    ``batch`` (forward, backward, optimizer; 2 per MAC; ``UpdateProfile.flops_total``);
    ``flops_per_sample = flops_update / batch`` (rounded): per image at that batch, so work that
    does not grow with the batch (an adapter's ``B A`` product, GaLore's projections, in
    ``flops_optimizer``) is spread over it.
    ``evaluations``: analytic profiles this row needed.
    """

    model: str
    resolution: int
    method: str
    rank: int | None
    lean: bool
    bn: str
    optimizer: str
    budget: int
    max_batch: int | None
    min_batch: int
    batch: int
    fits: bool
    capped: bool
    memory_peak: int
    memory_by_category: dict[str, int]
    headroom: int
    flops_per_sample: int
    flops_optimizer: int
    flops_update: int
    trainable_params: int
    total_params: int
    evaluations: int
    peaks: dict[int, int] = field(default_factory=dict, repr=False)  # every batch evaluated

    @property
    def label(self) -> str:
        return PlanConfig(self.method, self.rank, self.lean).label

    def to_dict(self) -> dict:
        """JSON-able dict of every field (``peaks`` keyed by batch as a string)."""
        d = asdict(self)
        d["peaks"] = {str(k): v for k, v in sorted(self.peaks.items())}
        return d


def _row(config: PlanConfig, prof: UpdateProfile, *, model: str, resolution: int, bn: str,
         optimizer: str, budget: int, max_batch: int | None, min_batch: int, capped: bool,
         peaks: dict[int, int]) -> PlanRow:
    n = prof.batch_size
    per_sample = round(prof.flops_total / n)
    return PlanRow(
        model=model, resolution=resolution, method=config.method, rank=config.rank,
        lean=config.lean, bn=bn, optimizer=optimizer, budget=budget, max_batch=max_batch,
        min_batch=min_batch, batch=n, fits=prof.memory_peak <= budget, capped=capped,
        memory_peak=prof.memory_peak,
        memory_by_category=dict(prof.memory_by_category), headroom=budget - prof.memory_peak,
        flops_per_sample=per_sample, flops_optimizer=prof.flops_optimizer,
        flops_update=prof.flops_total, trainable_params=prof.trainable_params,
        total_params=prof.total_params, evaluations=len(peaks), peaks=dict(peaks))


class _AnalyticPeak:
    """``peak(n)``: the analytic peak bytes of one update at batch ``n``; keeps each profile."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, resolution: int,
                 what: str) -> None:
        self.model, self.optimizer, self.resolution, self.what = model, optimizer, resolution, what
        self.profiles: dict[int, UpdateProfile] = {}

    def __call__(self, n: int) -> int:
        from convpeft.profiler import analytic_profile

        if n in self.profiles:
            return self.profiles[n].memory_peak
        res = self.resolution
        try:
            p = analytic_profile(self.model, self.optimizer, (n, 3, res, res), compare_torch=False)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.what}, batch {n} x 3 x {res} x {res}: {first} (if the "
                             "input is too small for the model, use a larger resolution)") from e
        self.profiles[n] = p
        return p.memory_peak


def _min_batch(peak: _AnalyticPeak, max_batch: int) -> int:
    """1, or 2 when the update fails at batch 1 but runs at 2 (train-mode BN on a 1x1 map)."""
    try:
        peak(1)
        return 1
    except ValueError as e:
        if max_batch < 2:
            raise
        try:
            peak(2)
        except ValueError:
            raise e from None
        return 2


def plan(
    model: str | Callable[[], nn.Module],
    budget: str | int,
    *,
    resolution: int = 224,
    methods: Sequence[str] | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
    lean: bool | str = False,
    bn: str = "train",
    optimizer: str = "adamw",
    batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    num_classes: int = 10,
    small_input: bool = False,
    progress: Callable[[int, int, PlanRow], None] | None = None,
) -> list[PlanRow]:
    """One :class:`PlanRow` per configuration: the largest batch whose update fits ``budget``.

    ``model``: a torchvision name or a zero-argument factory (built on the meta device);
    ``budget``: bytes or a string such as ``"512MiB"`` (:func:`parse_budget`); inputs are
    ``(N, 3, resolution, resolution)``. ``methods`` (default: every registered method), ``ranks``
    and ``lean`` (``False``, ``True`` or ``"both"``) span the configurations
    (:func:`expand_configs`); ``bn`` and ``optimizer`` (:data:`OPTIMIZERS`) apply to all. With
    ``batch=N`` each row says whether batch ``N`` fits instead of searching. The search stops
    at ``max_batch``. ``progress(i, total, row)`` is called after each row.

    Rows are sorted best first: largest max batch, then lowest peak (with ``batch``: fitting
    rows first, then lowest peak). ``ValueError`` (saying what to change) for bad arguments or a
    resolution the model cannot take.
    """
    from convpeft.methods import BN_POLICIES

    budget_bytes = parse_budget(budget)
    for name, v in (("resolution", resolution), ("max_batch", max_batch),
                    ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be an integer >= 1 or None (got {batch!r})")
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {', '.join(BN_POLICIES)} (got {bn!r})")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if isinstance(model, str):
        from convpeft.models import list_models

        if model not in list_models():
            raise ValueError(f"unknown model {model!r}; use a torchvision classification model "
                             "name (convpeft.models.list_models()), e.g. mobilenet_v2")
        model_name = model
    elif callable(model):
        model_name = getattr(model, "__name__", type(model).__name__)
    else:
        raise ValueError(f"model must be a model name or a factory returning an nn.Module "
                         f"(got {type(model).__name__})")
    configs = expand_configs(methods, ranks, lean, optimizer)

    rows: list[PlanRow] = []
    for i, config in enumerate(configs):
        net, opt = build_configured(model, config, bn=bn, optimizer=optimizer,
                                    num_classes=num_classes, small_input=small_input)
        peak = _AnalyticPeak(net, opt, resolution, f"{model_name} + {config.label}")
        common = {"model": model_name, "resolution": resolution, "bn": bn,
                  "optimizer": optimizer, "budget": budget_bytes}
        if batch is not None:
            peak(batch)
            row = _row(config, peak.profiles[batch], max_batch=None, min_batch=1, capped=False,
                       peaks={batch: peak.profiles[batch].memory_peak}, **common)
        else:
            lowest = _min_batch(peak, max_batch)
            best, peaks = largest_fitting(peak, budget_bytes, max_batch, lowest)
            row = _row(config, peak.profiles[max(best, lowest)], max_batch=best,
                       min_batch=lowest, capped=best == max_batch, peaks=peaks, **common)
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(configs), row)
    order = {c: k for k, c in enumerate(configs)}

    def key(r: PlanRow) -> tuple:
        first = -r.max_batch if r.max_batch is not None else (not r.fits)
        return first, r.memory_peak, order[PlanConfig(r.method, r.rank, r.lean)]

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- output
_CATS = (("params", "params"), ("grads", "grads"), ("optimizer", "optim"),
         ("activations", "activ"), ("temporaries", "temps"), ("buffers", "bufs"))


def format_plan(rows: Sequence[PlanRow]) -> str:
    """A readable table of ``rows`` (as :func:`plan` returns them), with a header line."""
    if not rows:
        return "no configuration planned"
    r0 = rows[0]
    asked = r0.max_batch is None
    head = (f"{r0.model} at {r0.resolution}x{r0.resolution}, budget {format_bytes(r0.budget)} "
            f"({r0.budget:,} bytes), BN {r0.bn}, {r0.optimizer}; predicted peak of one update "
            f"(tensor level, MiB)")
    if asked:
        head += f", batch {r0.batch}"
    cols = (f"{'configuration':<18}{'fits' if asked else 'max batch':>10}{'peak':>9}"
            f"{'headroom':>10}" + "".join(f"{short:>8}" for _, short in _CATS)
            + f"{'GFLOP/img':>10}{'trainable':>12}")
    lines = [head, cols]
    for r in rows:
        if asked:
            first = "yes" if r.fits else "no"
        else:
            first = f">={r.max_batch}" if r.capped else str(r.max_batch)
        mib = [r.memory_by_category.get(c, 0) / 2**20 for c, _ in _CATS]
        lines.append(f"{r.label:<18}{first:>10}{r.memory_peak / 2**20:>9.1f}"
                     f"{r.headroom / 2**20:>10.1f}" + "".join(f"{v:>8.1f}" for v in mib)
                     + f"{r.flops_per_sample / 1e9:>10.3f}{r.trainable_params:>12,}")
    if not asked:
        none = [r.label for r in rows if r.max_batch == 0]
        if none:
            lines.append("does not fit even at the smallest batch (figures at that batch): "
                         + ", ".join(none))
        two = [r.label for r in rows if r.min_batch > 1]
        if two:
            lines.append("smallest batch 2 (train-mode BN cannot take batch 1 on a 1x1 feature "
                         f"map): {', '.join(two)}")
        capped = [r.label for r in rows if r.capped]
        if capped:
            lines.append(f"larger batches may fit too (search capped at max batch): "
                         f"{', '.join(capped)}")
    return "\n".join(lines)


def plot_plan(rows: Iterable[PlanRow], path: str | Path) -> Path:
    """Max batch against rank, one line per ranked method (dashed: lean), a horizontal line per
    method without a rank (dotted: lean), written to ``path`` (format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convpeft.methods import get_method, list_methods

    rows = list(rows)
    if not rows:
        raise ValueError("nothing to plot: no rows")
    if any(r.max_batch is None for r in rows):
        raise ValueError("rows from a fixed batch have no max batch to plot; plan without batch")
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(list_methods())}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranks = sorted({r.rank for r in rows if r.rank is not None})
    for lean in (False, True):
        for method in dict.fromkeys(r.method for r in rows if r.lean == lean):
            sel = [r for r in rows if r.method == method and r.lean == lean]
            label = get_method(method).label + (", lean" if lean else "")
            color = colors.get(method)
            if sel[0].rank is None:
                ax.axhline(sel[0].max_batch, color=color, linestyle=":" if lean else "-.",
                           linewidth=1.2, label=f"{label} (no rank)")
            else:
                sel.sort(key=lambda r: r.rank)
                ax.plot([r.rank for r in sel], [r.max_batch for r in sel], color=color,
                        linestyle="--" if lean else "-", marker="o",
                        markerfacecolor="white" if lean else color, label=label)
    if ranks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("largest batch that fits")
    ax.set_ylim(bottom=0)
    r0 = rows[0]
    capped = " (capped at max batch)" if any(r.capped for r in rows) else ""
    ax.set_title(f"{r0.model}, {r0.resolution}x{r0.resolution}, budget "
                 f"{format_bytes(r0.budget)}, BN {r0.bn}, {r0.optimizer}{capped}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
