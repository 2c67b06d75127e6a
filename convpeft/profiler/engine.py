"""The instrumented update that the measured and the analytic profiler both run.

One update is ``optimizer.zero_grad(set_to_none=True)``, forward, loss, backward,
``optimizer.step()``. :func:`run_instrumented` runs it ONCE under a single dispatch mode
(:class:`Instrument`) that counts FLOPs (:mod:`.flop_counter`) and tracks live storages
(:mod:`.memory`) in the same Python call per op, with a ``saved_tensors_hooks`` pack hook telling
the tracker what autograd keeps for backward. It returns an :class:`InstrumentedRun`; turning that
into an :class:`~convpeft.profiler.profile.UpdateProfile` is :mod:`.profile`'s job.

The engine does not care whether tensors hold data: :mod:`.analytic` calls the same functions on
a meta copy of the model, which is why analytic and measured figures agree.

The tensors an op returns are not all the device holds: cuDNN/cuBLAS workspaces on CUDA,
oneDNN's blocked-layout copies on the CPU live inside an op and are freed before it returns. On
CUDA an :class:`AllocatorProbe` reads the allocator's own peak around every op; on the CPU,
which keeps no allocator statistics, :class:`~convpeft.profiler.cpu_trace.CpuTrace` brackets
every op with a profiler marker and replays the allocation trace afterwards; on the meta device
(analytic) a :class:`~convpeft.profiler.scratch.ScratchModel` predicts each op's scratch. Either
way the run records the device's peak and the op's clock tick, so the tensors live at that
moment are the tracker's to say, and the difference is the ``scratch`` category. The probe is
injectable so that this logic is tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from convpeft.core.amp import autocast
from convpeft.profiler.cpu_trace import CpuTrace
from convpeft.profiler.flop_counter import FlopCounter, FlopTally
from convpeft.profiler.layer_tracker import LayerTracker
from convpeft.profiler.memory import MemoryReport, MemoryTracker, state_tensors, storage_key
from convpeft.profiler.scratch import OpShape, ScratchModel, op_features

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class RefreshingOptimizer(Protocol):
    """An optimizer whose step is ordinary except for a periodic, expensive refresh (GaLore's
    SVD of the gradient every ``update_proj_gap`` steps). The profiler measures an ordinary step
    and adds the refresh amortised over the period. Any optimizer implementing these three
    members gets that treatment; :class:`convpeft.optim.ConvGaLoreAdamW` does."""

    update_proj_gap: int

    def refreshes_next_step(self) -> bool:
        """Whether the next ``step()`` recomputes the projections."""
        ...

    def projection_refresh_flops(self) -> int:
        """FLOPs of one refresh (2 per multiply-accumulate)."""
        ...


class AllocatorProbe(Protocol):
    """Reads a device allocator: ``reset_peak()`` then ``peak()`` gives the highest allocated
    bytes since the reset; ``current()`` the bytes allocated now."""

    def reset_peak(self) -> None: ...

    def peak(self) -> int: ...

    def current(self) -> int: ...


class CudaProbe:
    """:class:`AllocatorProbe` of one CUDA device: the caching allocator's ``allocated_bytes``
    (what ``torch.cuda.max_memory_allocated``/``memory_allocated`` report). Read per op, so it
    takes the nested statistics as they come from C++ (``memory_stats_as_nested_dict``) rather
    than the flattened dict those two helpers build in Python on every call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _allocated(self) -> dict:
        return torch.cuda.memory_stats_as_nested_dict(self.device)["allocated_bytes"]["all"]

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(self._allocated()["peak"])

    def current(self) -> int:
        return int(self._allocated()["current"])


@dataclass
class DevicePeak:
    """The allocator's peak over an update: ``raw`` as read, ``peak`` without the bytes that were
    not this update's (other tensors on the device), and the tracker's clock ``tick`` right after
    the op that reached it; the tensors live then are the tracker's to say
    (:meth:`MemoryTracker.live_at`), the rest is workspace (kernel scratch, allocator rounding)."""

    raw: int
    peak: int
    tick: int
    op: str = ""  # the aten op running at the peak


@dataclass
class InstrumentedRun:
    """What one instrumented update measured (everything :mod:`.profile` needs)."""

    tally: FlopTally  # FLOPs by phase (and per layer when asked)
    memory: MemoryReport  # tensor-level peak and categories
    wall_s: float
    cpu_s: float
    flops_torch: int | None  # torch's FlopCounterMode total for the same ops
    device_peak: DevicePeak | None  # allocator reading (CUDA, CPU trace, injected probe) or
    # the scratch model's prediction (analytic)
    tensor_peak: int = 0  # the tensor-level peak (live storages only)
    # with collect_scratch: each op's shapes and measured excess (bytes held beyond its
    # outputs), from the CPU trace or the allocator probe: what :func:`convpeft.calibrate` fits
    op_scratch: list[tuple[OpShape | None, int]] | None = None
    # analytic: the op kinds the scratch model never measured (predicted with its margin)
    unmeasured_ops: list[str] = field(default_factory=list)


class Instrument(TorchDispatchMode):
    """One dispatch mode doing FLOP counting and storage tracking (one Python call per op), and,
    with a probe, reading the allocator's peak around each op."""

    def __init__(self, counter: FlopCounter, tracker: MemoryTracker,
                 probe: AllocatorProbe | None = None, foreign: int = 0,
                 trace: CpuTrace | None = None, scratch: ScratchModel | None = None,
                 collect: bool = False) -> None:
        super().__init__()
        self.counter = counter
        self.tracker = tracker
        self.probe = probe
        self.foreign = foreign  # allocator bytes that are not this update's (other tensors)
        self.trace = trace  # CPU allocator trace: markers per op, peak found after the run
        self.scratch = scratch  # analytic: predicted kernel scratch per op
        self.collect = collect  # record each op's shapes and excess (calibration)
        self.op_features: list[OpShape | None] = []  # per traced op (CPU trace)
        self.probe_samples: list[tuple[OpShape | None, int]] = []  # per probed op: excess
        self.device_peak: DevicePeak | None = None
        self.unmeasured: dict[str, None] = {}  # op kinds the scratch model never measured

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracker = self.tracker
        # an op returning a view or alias of an input (views, in-place, out=) allocates nothing
        # (no storage, no kernel scratch), so it cannot raise the device peak: not probed
        alias = tracker.returns_alias(func)
        probe = None if alias else self.probe
        if probe is not None:
            probe.reset_peak()
        trace = self.trace
        if trace is not None and not alias:
            with trace.marker(func):
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        tracker.on_output(out, func)
        self.counter.record(func, args, kwargs, out)
        # shapes for the scratch model: to predict (analytic) or, when calibrating, to record
        shape = (op_features(func, args, kwargs, out)
                 if not alias and (self.scratch is not None or self.collect) else None)
        if trace is not None and not alias:
            trace.set_tick(tracker.tick)
            self.op_features.append(shape)
        if self.scratch is not None and not alias:
            # the op peaks with its inputs and outputs live plus its scratch (predicted)
            raw = tracker.current + self.scratch.predict(shape)
            if self.scratch.unmeasured(shape):
                self.unmeasured[shape.key] = None
            if self.device_peak is None or raw > self.device_peak.raw:
                self.device_peak = DevicePeak(raw=raw, peak=raw, tick=tracker.tick,
                                              op=str(func))
        if probe is not None:
            # the op peaked with its inputs and its (new) outputs live, plus its scratch
            raw = probe.peak()
            if self.collect:
                self.probe_samples.append((shape, max(0, raw - probe.current())))
            if self.device_peak is None or raw > self.device_peak.raw:
                self.device_peak = DevicePeak(raw=raw, peak=raw - self.foreign,
                                              tick=tracker.tick, op=str(func))
        return out


def check_inputs(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                 targets: torch.Tensor) -> None:
    """Refuse, before anything runs, a batch or optimizer that would fail or change nothing."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must "
                         "have the same (non-empty) batch dimension")
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (0 samples): profile a batch of at least one")
    # checked before anything runs: a NaN/inf batch would write NaN into the caller's
    # parameters and BN running statistics during the real updates of the profile
    if (inputs.device.type != "meta" and inputs.is_floating_point()
            and not bool(torch.isfinite(inputs).all())):
        raise ValueError("the inputs contain NaN or inf; profiling runs real updates, which "
                         "would write NaN into the model's weights and BN statistics")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter of the model is frozen, so an update changes nothing; "
                         "unfreeze what should train (or apply a PEFT method) first")
    model_params = {id(p) for p in model.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(id(p) in model_params for p in opt_params):
        raise ValueError(f"the optimizer ({type(optimizer).__name__}, {len(opt_params)} params) "
                         "holds no parameter of the model: build it from model.parameters() "
                         "after applying the PEFT method")
    if not any(id(p) in model_params and p.requires_grad for p in opt_params):
        raise ValueError("the optimizer holds only frozen parameters of the model: build it "
                         "from [p for p in model.parameters() if p.requires_grad]")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and (inputs.dim() != 4 or inputs.shape[1] != first.in_channels):
        raise ValueError(f"the model's first conv takes (N, {first.in_channels}, H, W) input; "
                         f"got a batch of shape {tuple(inputs.shape)}")


def forward_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 loss_fn: LossFn, amp: str = "off") -> torch.Tensor:
    """``loss_fn(model(inputs), targets)``, with errors that say which side does not fit; under
    ``torch.autocast`` for ``amp`` != "off" (backward then runs outside it)."""
    # any exception a model raises on a batch (torchvision's ViT asserts its input size) is
    # the model refusing the input: a clean error naming the shape, not a traceback
    try:
        with autocast(inputs.device, amp):
            out = model(inputs)
    except Exception as e:  # noqa: BLE001 - re-raised as ValueError, the cause chained
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the model failed on a batch of shape {tuple(inputs.shape)}: "
                         f"{what}") from e
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model returned {type(out).__name__}, not a tensor of logits "
                         "(torchvision's GoogLeNet and Inception v3 return auxiliary logits in "
                         "train mode): profile a model whose forward returns the logits, e.g. "
                         "built with aux_logits=False")
    try:
        with autocast(inputs.device, amp):
            loss = loss_fn(out, targets)
    except Exception as e:  # noqa: BLE001 - re-raised as ValueError, the cause chained
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model output {shape} does not fit the loss "
                         f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)} with targets "
                         f"{tuple(targets.shape)} {targets.dtype}: {e}") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("the loss must be a scalar tensor")
    return loss


def plain_update(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                 targets: torch.Tensor, loss_fn: LossFn, amp: str = "off") -> None:
    """One uninstrumented training update."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(model, inputs, targets, loss_fn, amp)
    loss.backward()
    del loss
    optimizer.step()


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
            targets: torch.Tensor, loss_fn: LossFn, warmup: int, amp: str = "off") -> bool:
    """Run ``warmup`` plain updates (lazily created optimizer state then exists), then, for a
    :class:`RefreshingOptimizer`, step past a refresh so that the measured update is an ordinary
    one (the refresh is accounted analytically). Returns whether the optimizer refreshes."""
    for _ in range(warmup):
        plain_update(model, optimizer, inputs, targets, loss_fn, amp)
    refreshing = isinstance(optimizer, RefreshingOptimizer)
    if refreshing:
        for _ in range(2):
            if not optimizer.refreshes_next_step():
                break
            plain_update(model, optimizer, inputs, targets, loss_fn, amp)
    return refreshing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_instrumented(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                     targets: torch.Tensor, loss_fn: LossFn, *, per_layer: bool = False,
                     compare_torch: bool = True,
                     probe: AllocatorProbe | None = None, amp: str = "off",
                     trace: bool = False, scratch: ScratchModel | None = None,
                     collect_scratch: bool = False) -> InstrumentedRun:
    """Run ONE update under the instrumentation. ``probe`` defaults to the CUDA allocator when
    ``inputs`` live on CUDA (None elsewhere). ``trace=True`` (CPU) reads the CPU allocator
    through :class:`~convpeft.profiler.cpu_trace.CpuTrace`; ``scratch`` (analytic, meta tensors)
    predicts the device peak as the tensors live at each op plus its modelled scratch.
    ``collect_scratch`` records every op's shapes and measured excess in ``op_scratch`` (what
    :func:`convpeft.calibrate` fits; off by default, it costs a shape walk per op)."""
    device = inputs.device
    if probe is None and device.type == "cuda":
        probe = CudaProbe(device)
    if trace and (device.type != "cpu" or probe is not None):
        raise ValueError("trace=True reads the CPU allocator: the batch must be on the CPU and "
                         "no other allocator probe given")
    # the update starts with zero_grad; doing it before tracking starts means no pre-existing
    # block is freed while a CPU trace runs (the profiler cannot see such frees)
    optimizer.zero_grad(set_to_none=True)
    params = list(model.parameters())
    param_keys = {storage_key(p) for p in params}
    layers = LayerTracker(model) if per_layer else None
    counter = FlopCounter(param_keys, layer_of=layers.layer_of if layers else None,
                          torch_flops=compare_torch)
    tracker = MemoryTracker()
    tracker.add_existing(params, "params")
    tracker.add_existing(model.buffers(), "buffers")
    tracker.add_existing([p.grad for p in params if p.grad is not None], "grads")
    tracker.add_existing(state_tensors(optimizer), "optimizer")
    tracker.add_existing([inputs, targets], None)
    sync(device)
    # what the allocator holds beyond the tracked storages (other models, caches) is not ours
    foreign = max(0, probe.current() - tracker.current) if probe is not None else 0
    resident = tracker.current  # live when tracking starts: the CPU trace counts from here
    cpu_trace = CpuTrace() if trace else None
    instrument = Instrument(counter, tracker, probe, foreign, trace=cpu_trace, scratch=scratch,
                            collect=collect_scratch)

    def set_phase(ph: str) -> None:
        counter.phase = ph
        if layers is not None:
            layers.phase = ph

    def pack(t: torch.Tensor) -> torch.Tensor:
        tracker.mark_saved(t)
        return t

    grad_records: set[int] = set()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with contextlib.ExitStack() as stack:
            if layers is not None:
                stack.enter_context(layers)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            if cpu_trace is not None:
                stack.enter_context(cpu_trace)
            stack.enter_context(instrument)
            set_phase("forward")
            optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(model, inputs, targets, loss_fn, amp)
            set_phase("backward")
            loss.backward()
            del loss
            # p.grad storages now: they are gradients even if the optimizer frees them later
            grad_records = tracker.live_grad_records(model)
            set_phase("optimizer")
            optimizer.step()
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        tracker.stop()
    cats = tracker.classify(model, optimizer, extra_grads=grad_records)
    dpeak = instrument.device_peak
    op_scratch = None
    if cpu_trace is not None:
        res = cpu_trace.result()
        at = res.peak_marker
        tick = cpu_trace.ticks[at] if 0 <= at < len(cpu_trace.ticks) else 0
        dpeak = DevicePeak(raw=resident + res.peak, peak=resident + res.peak, tick=tick,
                           op=cpu_trace.names[at] if 0 <= at < len(cpu_trace.names) else "")
        if collect_scratch:
            # every traced op, also those that allocated nothing (the trace has no event for
            # them): measured at zero scratch, which the device model must know it measured
            excess = {o.index: o.excess for o in res.ops}
            op_scratch = [(s, excess.get(i, 0)) for i, s in enumerate(instrument.op_features)]
    elif instrument.probe_samples:
        op_scratch = instrument.probe_samples
    if dpeak is None:
        memory = tracker.report(cats)
    elif dpeak.peak > tracker.peak:
        # the device peaked above the tensor-level peak: report the moment the device did
        memory = tracker.report(cats, at=dpeak.tick,
                                workspace=max(0, dpeak.peak - tracker.live_at(dpeak.tick)))
    else:
        memory = tracker.report(cats, workspace=0)
    if layers is not None:
        counter.tally.layer_kinds = layers.kinds
    return InstrumentedRun(tally=counter.tally, memory=memory, wall_s=wall, cpu_s=cpu,
                           flops_torch=counter.tally.torch if compare_torch else None,
                           device_peak=dpeak, tensor_peak=tracker.peak, op_scratch=op_scratch,
                           unmeasured_ops=list(instrument.unmeasured))
