"""``profile_update`` / ``analytic_profile``: what ONE training update of a model + optimizer +
batch costs, as an :class:`UpdateProfile`.

One update is ``optimizer.zero_grad(set_to_none=True)``, forward, loss, backward,
``optimizer.step()``. :func:`profile_update` runs ``warmup`` plain updates (so lazily created
optimizer state exists and is counted), then ONE instrumented update (:mod:`.engine`: a single
dispatch mode that counts FLOPs (:mod:`.flop_counter`) and tracks live storages (:mod:`.memory`)
at once), then ``repeat`` plain updates that are timed. :func:`analytic_profile` runs the same
instrumented update on a meta copy (:mod:`.analytic`): shapes only, no compute. Profiling
therefore costs the instrumented update (two to three plain steps' worth) plus the timed steps.
torch's ``FlopCounterMode`` figure (``flops_torch``) comes from torch's own per-op formulas
applied in the same pass. The model and optimizer are really updated ``warmup + 1 + repeat``
times.

Memory is the device's: ``memory_peak`` is the allocator's peak over the instrumented update
(on the CPU from torch.profiler's allocation trace, :mod:`.cpu_trace`; on CUDA from the caching
allocator read around every op), with the bytes beyond the live tensors at that moment as a
``scratch`` category (kernel scratch: oneDNN's blocked-layout copies on the CPU, cuDNN/cuBLAS
workspaces on CUDA). The tensor-level peak (what ops return, exact and device-independent) is
``memory_peak_tensors``. :func:`analytic_profile` predicts the device peak from shapes with the
per-op scratch model of :mod:`.scratch` for the device it names (``memory_model`` says which).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from convpeft.core.amp import check_amp
from convpeft.profiler.analytic import OptimizerArg, meta_setup
from convpeft.profiler.engine import (
    InstrumentedRun,
    LossFn,
    check_inputs,
    plain_update,
    run_instrumented,
    sync,
    warm_up,
)
from convpeft.profiler.flop_counter import FlopTally
from convpeft.profiler.scratch import ScratchModel, scratch_model
from convpeft.profiler.scratch import device_name as scratch_device_name


@dataclass
class UpdateProfile:
    """Cost of one training update. FLOPs use 2 FLOPs per multiply-accumulate.

    * ``flops_forward``: conv/linear/matmul FLOPs of forward + loss.
    * ``flops_backward = flops_backward_input + flops_backward_weight``: the gradient products
      autograd actually ran (no input gradient into the first layer or a frozen prefix, no weight
      gradient for frozen weights).
    * ``flops_optimizer``: matmul/SVD work of ``optimizer.step`` per update: for GaLore the
      projection matmuls plus the SVD refresh amortised over ``update_proj_gap``;
      ``flops_optimizer_refresh`` is the cost of a step that does refresh (None otherwise).
    * ``flops_total = flops_forward + flops_backward + flops_optimizer``.
    * ``flops_elementwise``: elementwise work (BN, activations, bias adds, pooling, loss,
      optimizer arithmetic), NOT in ``flops_total``; split by phase in the ``_forward``,
      ``_backward`` and ``_optimizer`` fields.
    * ``flops_torch``: torch's ``FlopCounterMode`` total for the same update (None if not run),
      to show where it differs (it charges grouped-conv weight gradients as dense).
    * ``memory_peak``: the device's peak during the update (params, buffers, state and batch
      included): the allocator's, read during the instrumented update (CPU: torch.profiler's
      allocation trace; CUDA: the caching allocator's allocated bytes), or, analytic, predicted
      for the device named in ``memory_model``; tensor-level only with
      ``allocator_peak=False``. ``memory_by_category``: what was live at that moment, the kernel
      scratch beyond the live tensors as ``scratch``; ``memory_category_max``: each category's
      OWN maximum over the update (these do not happen at the same moment and must not be
      summed into a peak). ``memory_peak_tensors``: the tensor-level peak (what ops return;
      exact, device-independent, what the analytic mode reproduces to the byte).
      ``memory_peak_allocator``: the allocator's raw reading (other tensors on the device
      included), None when no allocator was read. ``memory_model``: what ``memory_peak`` is;
      ``memory_peak_op``: the aten op running at the device's peak ("" when the tensor-level
      peak, between ops, is the higher one). ``memory_unmeasured_ops`` (analytic): the op kinds
      (scratch-model keys) the device model never measured; each is predicted with a margin
      (:data:`~convpeft.profiler.scratch.UNMEASURED_MARGIN`), so ``memory_peak`` is an estimate
      there: ``calibrate`` on a model that has them, or verify on the device.
    * ``step_time_s``: median wall time of the ``repeat`` timed updates; ``step_time_iqr_s``
      their inter-quartile range; ``instrumented_time_s``: the instrumented update. The
      ``*_cpu_time_s`` twins are this process's CPU time (all threads), steadier than wall time
      on a shared machine (CPU only; on CUDA they miss the device work).
    * ``amp``: the compute dtype, ``"off"`` (fp32), ``"bf16"`` or ``"fp16"``: forward and loss
      ran under ``torch.autocast`` (backward follows the forward's dtypes), parameters, their
      gradients and the optimizer state stay fp32. FLOPs do not depend on it. Memory counts
      what lives: activations saved in the compute dtype (about half of fp32's), and the
      low-precision weight copies autocast makes, under ``activations`` where a backward keeps
      them, else ``temporaries``.
    """

    flops_forward: int
    flops_backward: int
    flops_backward_input: int
    flops_backward_weight: int
    flops_optimizer: int
    flops_optimizer_refresh: int | None
    flops_total: int
    flops_elementwise: int
    flops_elementwise_forward: int
    flops_elementwise_backward: int
    flops_elementwise_optimizer: int
    flops_torch: int | None
    memory_peak: int
    memory_by_category: dict[str, int]
    memory_category_max: dict[str, int]
    memory_baseline: int
    memory_peak_allocator: int | None
    step_time_s: float | None
    step_time_iqr_s: float | None
    instrumented_time_s: float
    step_cpu_time_s: float | None
    instrumented_cpu_time_s: float
    trainable_params: int
    total_params: int
    batch_size: int
    input_shape: list[int]
    device: str
    analytic: bool = False
    per_layer: list[dict] | None = field(default=None)
    amp: str = "off"
    memory_peak_tensors: int = 0
    memory_model: str = "tensor-level"
    memory_peak_op: str = ""
    memory_unmeasured_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able dict of every field (category dicts and per-layer rows stay nested)."""
        return asdict(self)

    def __str__(self) -> str:
        return format_profile(self)


def _fmt_flops(f: int | None) -> str:
    return "-" if f is None else f"{f / 1e6:,.2f} MFLOP"


def _fmt_bytes(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.2f} MiB"


def format_profile(p: UpdateProfile) -> str:
    """A readable breakdown table of an :class:`UpdateProfile`."""
    lines = [
        f"update on {p.device}, input {tuple(p.input_shape)}"
        + (f", autocast {p.amp}" if p.amp != "off" else "")
        + (" (analytic: shapes only)" if p.analytic else ""),
        f"params: {p.trainable_params:,} trainable / {p.total_params:,} total",
        "",
        "FLOPs (2 per MAC)",
        f"  forward             {_fmt_flops(p.flops_forward):>22}",
        f"  backward input-grad {_fmt_flops(p.flops_backward_input):>22}",
        f"  backward weight-grad{_fmt_flops(p.flops_backward_weight):>22}",
        f"  optimizer           {_fmt_flops(p.flops_optimizer):>22}",
    ]
    if p.flops_optimizer_refresh is not None:
        lines.append(f"  optimizer (refresh) {_fmt_flops(p.flops_optimizer_refresh):>22}")
    lines += [
        f"  total               {_fmt_flops(p.flops_total):>22}",
        f"  elementwise (apart) {_fmt_flops(p.flops_elementwise):>22}",
        f"  torch FlopCounter   {_fmt_flops(p.flops_torch):>22}",
        "",
        f"memory (bytes live at the simultaneous peak | each category's own max; "
        f"{p.memory_model})",
    ]
    for c in p.memory_by_category:
        lines.append(f"  {c:<12} {_fmt_bytes(p.memory_by_category[c]):>14} | "
                     f"{_fmt_bytes(p.memory_category_max[c]):>14}")
    lines.append(f"  {'PEAK':<12} {_fmt_bytes(p.memory_peak):>14}")
    lines.append(f"  {'tensors':<12} {_fmt_bytes(p.memory_peak_tensors):>14}"
                 "   (tensor-level peak: what ops return)")
    if p.memory_unmeasured_ops:
        lines.append(f"  op kinds the device model never measured (predicted with a margin): "
                     f"{', '.join(p.memory_unmeasured_ops)}")
    if p.step_time_s is not None:
        lines += ["", f"time per update: {p.step_time_s * 1e3:.2f} ms "
                      f"(IQR {p.step_time_iqr_s * 1e3:.2f} ms)"]
    if p.per_layer:
        lines += ["", f"{'layer':<40} {'kind':<10} {'fwd MF':>9} {'bwd-in MF':>10} "
                      f"{'bwd-w MF':>9}"]
        for r in p.per_layer:
            lines.append(f"{r['name'][:40]:<40} {str(r['kind']):<10} {r['forward'] / 1e6:>9.3f} "
                         f"{r['backward_input'] / 1e6:>10.3f} {r['backward_weight'] / 1e6:>9.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def profile_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    warmup: int = 1,
    repeat: int = 5,
    per_layer: bool = False,
    compare_torch: bool = True,
    analytic: bool = False,
    allocator_peak: bool | None = None,
    amp: str = "off",
) -> UpdateProfile:
    """Profile one training update of ``model`` with ``optimizer`` on ``inputs`` (N, C, H, W)
    and ``targets`` (N,) (see the module docstring for what runs).

    ``loss_fn`` defaults to ``nn.CrossEntropyLoss()``. ``per_layer=True`` adds per-layer FLOP rows
    (a little slower). ``compare_torch`` also sums torch's ``FlopCounterMode`` formulas over the
    same ops (``flops_torch``). ``analytic=True`` forwards to :func:`analytic_profile` with the
    batch's shapes: no real compute, and the model/optimizer are not touched.
    ``allocator_peak`` (default: on for CPU and CUDA) reads the device's allocator during the
    instrumented update, so ``memory_peak`` is the device's peak with a ``scratch`` category;
    on the CPU that runs the update under torch.profiler's memory trace (slower);
    ``allocator_peak=False`` there gives the tensor-level figure alone.
    ``amp`` ("off", "bf16", "fp16"; fp16 on CUDA only) runs every update's forward and loss under
    ``torch.autocast`` in that dtype (no loss scaling: it changes no cost but an elementwise
    unscale); not with ``analytic=True``, which traces on the meta device where autocast
    does not exist. Raises ``ValueError`` for a batch the model cannot take, an output that
    does not fit the loss, or an optimizer holding no parameter of the model.
    """
    check_amp(amp, inputs.device if not analytic else "cpu")
    if analytic:
        if amp != "off":
            raise ValueError(f"amp={amp!r} with analytic=True: the analytic profile traces on the "
                             "meta device, which has no autocast; profile a real batch "
                             "(analytic=False) or use amp='off'")
        return analytic_profile(model, optimizer, tuple(inputs.shape), targets=targets,
                                loss_fn=loss_fn, warmup=warmup, per_layer=per_layer,
                                compare_torch=compare_torch)
    if warmup < 0 or repeat < 0:
        raise ValueError("warmup and repeat must be >= 0")
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    check_inputs(model, optimizer, inputs, targets)
    device = inputs.device
    refreshing = warm_up(model, optimizer, inputs, targets, loss_fn, warmup, amp=amp)
    trace = device.type == "cpu" and allocator_peak is not False
    if device.type == "cuda" and allocator_peak is False:
        raise ValueError("allocator_peak=False on CUDA: the CUDA allocator is always read (it "
                         "costs nothing there); memory_peak_tensors has the tensor-level figure")
    run = run_instrumented(model, optimizer, inputs, targets, loss_fn, per_layer=per_layer,
                           compare_torch=compare_torch, amp=amp, trace=trace)
    # the allocator's own reading (everything on the device, like torch.cuda.max_memory_allocated)
    allocator = run.device_peak.raw if run.device_peak is not None else None

    times, cpu_times = [], []
    for _ in range(repeat):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        plain_update(model, optimizer, inputs, targets, loss_fn, amp=amp)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    prof = _to_profile(model, optimizer, inputs, run, refreshing, allocator=allocator,
                       times=times, cpu_times=cpu_times)
    prof.amp = amp
    if run.device_peak is not None and run.device_peak.peak >= run.tensor_peak:
        prof.memory_peak_op = run.device_peak.op
    if device.type == "cuda":
        prof.memory_model = f"CUDA allocator ({scratch_device_name(device)})"
    elif trace:
        prof.memory_model = f"CPU allocator trace ({scratch_device_name(device)})"
    return prof


def analytic_profile(
    model: nn.Module,
    optimizer: OptimizerArg,
    input_shape: Sequence[int],
    *,
    targets: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    warmup: int = 1,
    per_layer: bool = False,
    compare_torch: bool = True,
    device: str | torch.device | None = "cpu",
    scratch: ScratchModel | None = None,
) -> UpdateProfile:
    """Predict :func:`profile_update`'s FLOPs and memory for a batch of ``input_shape``
    ``(N, C, H, W)`` without real data or compute; ``model``/``optimizer`` are left untouched.

    ``optimizer`` is either an optimizer over ``model``'s parameters (it is copied with the model,
    state included) or a factory ``model -> optimizer`` called on the meta copy. Targets are
    class indices of shape ``(N,)`` unless ``targets`` is given (only its shape and dtype are
    used). Step times are None. ``memory_peak`` predicts the device peak on ``device`` ("cpu" or
    "cuda"): the tensor-level timeline plus each op's kernel scratch from ``scratch`` (default:
    :func:`~convpeft.profiler.scratch.scratch_model` of that device: its calibration if
    :func:`convpeft.calibrate` cached one, else the shipped default), as a ``scratch``
    category; ``memory_model`` names the model. ``device=None`` gives the tensor-level figure
    alone (exactly :func:`profile_update`'s ``memory_peak_tensors``).
    """
    model_for = None
    if device is not None:
        model_for = scratch if scratch is not None else scratch_model(device)
    mmodel, mopt, x, y = meta_setup(model, optimizer, input_shape, targets)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    check_inputs(mmodel, mopt, x, y)
    refreshing = warm_up(mmodel, mopt, x, y, loss_fn, warmup)
    run = run_instrumented(mmodel, mopt, x, y, loss_fn, per_layer=per_layer,
                           compare_torch=compare_torch, scratch=model_for)
    prof = _to_profile(mmodel, mopt, x, run, refreshing, allocator=None, times=[], cpu_times=[])
    prof.analytic = True
    prof.device = "meta (analytic)"
    if run.device_peak is not None and run.device_peak.peak >= run.tensor_peak:
        prof.memory_peak_op = run.device_peak.op
    prof.memory_model = ("tensor-level" if model_for is None else
                         f"predicted for {torch.device(device).type}: {model_for.source}")
    prof.memory_unmeasured_ops = list(run.unmeasured_ops)
    return prof


def _optimizer_flops(optimizer: torch.optim.Optimizer, tally: FlopTally,
                     refreshing: bool) -> tuple[int, int | None]:
    """(optimizer FLOPs per update, FLOPs of a refreshing step or None)."""
    if refreshing:
        # an ordinary step's matmuls were measured; add the refresh amortised over its period
        step_mm = tally.optimizer
        refresh = int(optimizer.projection_refresh_flops())
        gap = max(1, int(optimizer.update_proj_gap))
        return step_mm + round(refresh / gap), step_mm + refresh
    return tally.optimizer + tally.optimizer_svd, None


def _to_profile(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                run: InstrumentedRun, refreshing: bool, *, allocator: int | None,
                times: list[float], cpu_times: list[float]) -> UpdateProfile:
    tally, mem = run.tally, run.memory
    flops_opt, flops_refresh = _optimizer_flops(optimizer, tally, refreshing)
    per_layer = None
    if tally.per_layer:
        per_layer = [{"name": n, "kind": tally.layer_kinds.get(n), **r}
                     for n, r in tally.per_layer.items()]
    if times:
        step = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        iqr = q[2] - q[0]
    else:
        step = iqr = None
    ew = tally.elementwise
    return UpdateProfile(
        flops_forward=tally.forward,
        flops_backward=tally.backward,
        flops_backward_input=tally.backward_input,
        flops_backward_weight=tally.backward_weight,
        flops_optimizer=flops_opt,
        flops_optimizer_refresh=flops_refresh,
        flops_total=tally.forward + tally.backward + flops_opt,
        flops_elementwise=sum(ew.values()),
        flops_elementwise_forward=ew["forward"],
        flops_elementwise_backward=ew["backward"],
        flops_elementwise_optimizer=ew["optimizer"],
        flops_torch=run.flops_torch,
        memory_peak=mem.peak,
        memory_by_category=mem.by_category,
        memory_category_max=mem.category_max,
        memory_baseline=mem.baseline,
        memory_peak_allocator=allocator,
        memory_peak_tensors=run.tensor_peak,
        step_time_s=step,
        step_time_iqr_s=iqr,
        instrumented_time_s=run.wall_s,
        step_cpu_time_s=statistics.median(cpu_times) if cpu_times else None,
        instrumented_cpu_time_s=run.cpu_s,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        batch_size=int(inputs.shape[0]),
        input_shape=[int(s) for s in inputs.shape],
        device=str(inputs.device),
        per_layer=per_layer,
    )
