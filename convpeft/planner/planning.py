"""The plan itself: per configuration, the largest batch whose update fits, as a :class:`PlanRow`.

:func:`plan` expands the configurations (:mod:`convpeft.planner.config`), builds each on the
meta device and hands :func:`convpeft.planner.search.largest_fitting` a peak function backed by
:func:`convpeft.profiler.analytic_profile` (:class:`_AnalyticPeak`, which keeps every profile so
the row's figures are those of the planned batch without evaluating it again). The peak is the
*device's*, predicted for ``device`` (tensors plus each op's kernel scratch,
:mod:`convpeft.profiler.scratch`), so a plan that says "fits" means the allocator stays within
the budget; ``verify=True`` then checks that on the device (:mod:`convpeft.planner.verify`).
The search starts at batch 1, or 2 where batch 1 cannot run (a train-mode BatchNorm on a 1x1
feature map). Rows come back best first so that the table and the CLI can print them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .budget import parse_budget
from .config import DEFAULT_RANKS, OPTIMIZERS, PlanConfig, build_configured, expand_configs
from .search import largest_fitting
from .verify import Verification, verify_row

if TYPE_CHECKING:
    from convpeft.profiler import UpdateProfile

DEFAULT_MAX_BATCH = 4096


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
    ``evaluations``: analytic profiles this row needed. ``checkpoint``: blocks checkpointed.
    ``blocks``: only the last ``blocks`` blocks train (None: every layer); ``prefix_chunks``:
    the frozen prefix's micro-batches.
    ``device``: the device kind the peak is predicted for; ``memory_model``: the scratch model
    used (:mod:`convpeft.profiler.scratch`); ``memory_peak_tensors``: the tensor-level part;
    ``unmeasured_ops``: op kinds of this update the scratch model never measured, each planned
    with a margin of :data:`~convpeft.profiler.scratch.UNMEASURED_MARGIN` times its largest
    operand instead of a fitted scratch (empty: every op kind was calibrated).
    ``verification``: with ``verify=True``, what real updates on the device measured
    (:class:`~convpeft.planner.verify.Verification`; its ``batch`` replaces nothing: the row's
    ``max_batch`` is what the verification settled on).
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
    checkpoint: bool = False
    device: str = "cpu"
    memory_model: str = ""
    memory_peak_tensors: int = 0
    verification: Verification | None = None
    blocks: int | None = None
    prefix_chunks: int = 1
    unmeasured_ops: list[str] = field(default_factory=list)

    @property
    def config(self) -> PlanConfig:
        return PlanConfig(self.method, self.rank, self.lean, self.checkpoint, self.blocks,
                          self.prefix_chunks)

    @property
    def label(self) -> str:
        return self.config.label

    def to_dict(self) -> dict:
        """JSON-able dict of every field (``peaks`` keyed by batch as a string)."""
        d = asdict(self)
        d["peaks"] = {str(k): v for k, v in sorted(self.peaks.items())}
        return d


def _row(config: PlanConfig, prof: UpdateProfile, *, model: str, resolution: int, bn: str,
         optimizer: str, budget: int, max_batch: int | None, min_batch: int, capped: bool,
         peaks: dict[int, int], device: str) -> PlanRow:
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
        total_params=prof.total_params, evaluations=len(peaks), peaks=dict(peaks),
        checkpoint=config.checkpoint, device=device, memory_model=prof.memory_model,
        memory_peak_tensors=prof.memory_peak_tensors, blocks=config.blocks,
        prefix_chunks=config.prefix_chunks, unmeasured_ops=list(prof.memory_unmeasured_ops))


class _AnalyticPeak:
    """``peak(n)``: the analytic peak bytes of one update at batch ``n``; keeps each profile."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, resolution: int,
                 what: str, device: str = "cpu", scratch=None) -> None:
        self.model, self.optimizer, self.resolution, self.what = model, optimizer, resolution, what
        self.device, self.scratch = device, scratch
        self.profiles: dict[int, UpdateProfile] = {}

    def __call__(self, n: int) -> int:
        from convpeft.profiler import analytic_profile

        if n in self.profiles:
            return self.profiles[n].memory_peak
        res = self.resolution
        try:
            p = analytic_profile(self.model, self.optimizer, (n, 3, res, res), compare_torch=False,
                                 device=self.device, scratch=self.scratch)
        except (RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # the resolution hint only where the model refused the input (not, e.g., an
            # output that is no logits tensor)
            hint = (" (if the input is too small for the model, use a larger resolution)"
                    if "failed on a batch" in first or not isinstance(e, ValueError) else "")
            raise ValueError(f"{self.what}, batch {n} x 3 x {res} x {res}: {first}{hint}") from e
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
    ranks: Sequence[int] | None = DEFAULT_RANKS,
    lean: bool | str = False,
    bn: str = "train",
    optimizer: str = "adamw",
    batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    num_classes: int = 10,
    small_input: bool = False,
    progress: Callable[[int, int, PlanRow], None] | None = None,
    device: str = "cpu",
    checkpoint: bool | str = False,
    verify: bool = False,
    scratch=None,
    blocks: Sequence[int | None] | None = None,
    prefix_chunks: Sequence[int] | None = None,
) -> list[PlanRow]:
    """One :class:`PlanRow` per configuration: the largest batch whose update fits ``budget``.

    ``model``: a torchvision name or a zero-argument factory (built on the meta device);
    ``budget``: bytes or a string such as ``"512MiB"`` (:func:`parse_budget`); inputs are
    ``(N, 3, resolution, resolution)``. ``methods`` (default: every registered method), ``ranks``
    and ``lean`` (``False``, ``True`` or ``"both"``) span the configurations
    (:func:`expand_configs`); ``bn`` and ``optimizer`` (:data:`OPTIMIZERS`) apply to all. With
    ``batch=N`` each row says whether batch ``N`` fits instead of searching. The search stops
    at ``max_batch``. ``progress(i, total, row)`` is called after each row.
    ``device`` ("cpu" or "cuda") is what the peak is predicted for (kernel scratch included;
    ``scratch`` overrides the model); ``checkpoint`` (like ``lean``) adds checkpointed
    configurations. ``verify=True`` runs real updates on ``device`` at each planned batch and
    the next one, and steps the batch down while the measured peak exceeds the budget (on
    CUDA the criterion is ``max_memory_reserved``); each row keeps the measurements.
    ``blocks`` (K values; None = every layer) and ``prefix_chunks`` add sparse updates that
    train only the last K blocks, the frozen prefix in that many micro-batches
    (:mod:`convpeft.memory.sparse`); a row's ``blocks``/``prefix_chunks`` say which, its
    ``trainable_params`` how much of the network trains.

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
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (got {device!r})")
    if device == "cuda" and scratch is None and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA GPU here, and the device model is looked up "
                         "by the GPU's name; plan on the machine with the GPU (calibrate it "
                         "there first), or plan for device 'cpu'")
    if verify and device == "cuda" and not torch.cuda.is_available():
        raise ValueError("verify=True on device 'cuda' needs a CUDA GPU here; plan without "
                         "verify, or verify on 'cpu'")
    configs = expand_configs(methods, ranks, lean, optimizer, checkpoint, blocks, prefix_chunks)

    rows: list[PlanRow] = []
    for i, config in enumerate(configs):
        net, opt = build_configured(model, config, bn=bn, optimizer=optimizer,
                                    num_classes=num_classes, small_input=small_input)
        peak = _AnalyticPeak(net, opt, resolution, f"{model_name} + {config.label}", device,
                             scratch)
        common = {"model": model_name, "resolution": resolution, "bn": bn,
                  "optimizer": optimizer, "budget": budget_bytes, "device": device}
        if batch is not None:
            peak(batch)
            row = _row(config, peak.profiles[batch], max_batch=None, min_batch=1, capped=False,
                       peaks={batch: peak.profiles[batch].memory_peak}, **common)
        else:
            lowest = _min_batch(peak, max_batch)
            best, peaks = largest_fitting(peak, budget_bytes, max_batch, lowest)
            row = _row(config, peak.profiles[max(best, lowest)], max_batch=best,
                       min_batch=lowest, capped=best == max_batch, peaks=peaks, **common)
        if verify:
            def build(c: PlanConfig = config):
                return build_configured(model, c, bn=bn, optimizer=optimizer,
                                        num_classes=num_classes, small_input=small_input,
                                        device=device)
            start = row.max_batch if row.max_batch is not None else row.batch
            v = row.verification = verify_row(
                start, build, budget=row.budget, resolution=row.resolution,
                min_batch=row.min_batch, probe_next=row.max_batch is not None and not row.capped,
                device=device, num_classes=num_classes)
            if row.max_batch is not None:
                row.max_batch, row.fits = v.batch, v.fits
            else:  # a fixed batch: does that batch fit when measured?
                row.fits = v.measured[row.batch] <= budget_bytes
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(configs), row)
    order = {c: k for k, c in enumerate(configs)}

    def key(r: PlanRow) -> tuple:
        first = -r.max_batch if r.max_batch is not None else (not r.fits)
        return first, r.memory_peak, order[r.config]

    return sorted(rows, key=key)
