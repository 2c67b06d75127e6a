"""``profile_update``: what ONE training update of a model + optimizer + batch costs.

One update is ``optimizer.zero_grad(set_to_none=True)``, forward, loss, backward,
``optimizer.step()``. :func:`profile_update` runs ``warmup`` plain updates (so lazily created
optimizer state exists and is counted), then ONE instrumented update under a single dispatch mode
that counts FLOPs (:mod:`.flop_counter`) and tracks live storages (:mod:`.memory`) at once, then
``repeat`` plain updates that are timed. Profiling therefore costs the instrumented update (two to
three plain steps' worth) plus the timed steps. torch's ``FlopCounterMode`` figure
(``flops_torch``) comes from torch's own per-op formulas applied in the same pass. The model and
optimizer are really updated ``warmup + 1 + repeat`` times.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convpeft.checkpoint import recomputing
from convpeft.layer_kinds import layer_kind
from convpeft.profiler.flop_counter import FlopCounter, FlopTally
from convpeft.profiler.memory import (
    CATEGORIES,
    MemoryTracker,
    allocator_peak_cpu,
    state_tensors,
    storage_key,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LAYER_KEY = "convpeft_layer"


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
    * ``memory_peak``: true simultaneous peak of live storage bytes during the update (params,
      buffers, state and batch included); ``memory_by_category``: what was live at that moment;
      ``memory_category_max``: each category's OWN maximum over the update (these do not happen at
      the same moment and must not be summed into a peak). ``memory_peak`` counts what ops
      return (tensors); ``memory_peak_allocator`` is the allocator's own peak, which adds the
      scratch kernels allocate and free inside one op: ``torch.cuda.max_memory_allocated``
      during the instrumented update on CUDA, on CPU (``allocator_peak=True``) a torch.profiler
      allocation trace of one extra update; None otherwise.
    * ``step_time_s``: median wall time of the ``repeat`` timed updates; ``step_time_iqr_s``
      their inter-quartile range; ``instrumented_time_s``: the instrumented update. The
      ``*_cpu_time_s`` twins are this process's CPU time (all threads), steadier than wall time
      on a shared machine (CPU only; on CUDA they miss the device work).
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
        "memory (bytes live at the simultaneous peak | each category's own max)",
    ]
    for c in CATEGORIES:
        lines.append(f"  {c:<12} {_fmt_bytes(p.memory_by_category[c]):>14} | "
                     f"{_fmt_bytes(p.memory_category_max[c]):>14}")
    lines.append(f"  {'PEAK':<12} {_fmt_bytes(p.memory_peak):>14}")
    if p.memory_peak_allocator is not None:
        lines.append(f"  {'allocator':<12} {_fmt_bytes(p.memory_peak_allocator):>14}"
                     "   (incl. kernel scratch)")
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
class _Instrument(TorchDispatchMode):
    """One dispatch mode doing both FLOP counting and storage tracking (one Python call/op)."""

    def __init__(self, counter: FlopCounter, tracker: MemoryTracker) -> None:
        super().__init__()
        self.counter = counter
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter.record(func, args, kwargs, out)
        self.tracker.on_output(out, func)
        return out


class _LayerTracker:
    """Attributes ops to the innermost module of ``model`` running them.

    Forward: a stack maintained by global module pre/post hooks. Backward: each module's post
    hook labels the not-yet-labelled autograd nodes behind its outputs (``node.metadata``), and
    ``torch._C._current_autograd_node()`` tells which node a backward op runs for.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules() if n}
        # an adapter wrapper reports the kind of the layer it wraps (``.base_layer``)
        self.kinds = {n: layer_kind(getattr(m, "base_layer", m)) for n, m in model.named_modules()
                      if n}
        self.stack: list[str] = []
        self.phase = "forward"
        self._handles: list = []

    def __enter__(self) -> _LayerTracker:
        reg = torch.nn.modules.module
        self._handles = [reg.register_module_forward_pre_hook(self._pre),
                         reg.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module: nn.Module, args) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append(name)

    def _post(self, module: nn.Module, args, output) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        todo = [t.grad_fn for t in tree_flatten(output)[0]
                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or _LAYER_KEY in node.metadata:
                continue
            node.metadata[_LAYER_KEY] = name
            todo.extend(nf for nf, _ in node.next_functions if nf is not None)

    def layer_of(self) -> str | None:
        # a checkpointed block recomputing in backward runs module hooks: the stack is right
        if self.phase == "backward" and not recomputing():
            node = torch._C._current_autograd_node()
            return None if node is None else node.metadata.get(_LAYER_KEY)
        return self.stack[-1] if self.stack else None


# ---------------------------------------------------------------------------------------------
def _check_inputs(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                  targets: torch.Tensor) -> None:
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


def _forward_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: LossFn) -> torch.Tensor:
    try:
        out = model(inputs)
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"the model failed on a batch of shape {tuple(inputs.shape)}: {e}") from e
    try:
        loss = loss_fn(out, targets)
    except (RuntimeError, ValueError, IndexError) as e:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model output {shape} does not fit the loss "
                         f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)} with targets "
                         f"{tuple(targets.shape)} {targets.dtype}: {e}") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("the loss must be a scalar tensor")
    return loss


def _update(model, optimizer, inputs, targets, loss_fn, set_phase=None) -> None:
    """One plain training update; ``set_phase`` (if given) is told which phase runs."""
    if set_phase:
        set_phase("forward")
    optimizer.zero_grad(set_to_none=True)
    loss = _forward_loss(model, inputs, targets, loss_fn)
    if set_phase:
        set_phase("backward")
    loss.backward()
    del loss
    if set_phase:
        set_phase("optimizer")
    optimizer.step()


def _is_galore(optimizer: torch.optim.Optimizer) -> bool:
    return all(hasattr(optimizer, a) for a in ("projection_refresh_flops", "step_flops",
                                               "update_proj_gap", "refreshes_next_step"))


def _warm_up(model, optimizer, inputs, targets, loss_fn, warmup: int) -> bool:
    """Run ``warmup`` plain updates (lazily created optimizer state then exists), then, for a
    GaLore optimizer, step past a projection refresh so that the measured update is an ordinary
    one (the refresh is accounted analytically). Returns whether the optimizer is GaLore."""
    for _ in range(warmup):
        _update(model, optimizer, inputs, targets, loss_fn)
    galore = _is_galore(optimizer)
    if galore:
        for _ in range(2):
            if not optimizer.refreshes_next_step():
                break
            _update(model, optimizer, inputs, targets, loss_fn)
    return galore


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    allocator_peak: bool = False,
) -> UpdateProfile:
    """Profile one training update of ``model`` with ``optimizer`` on ``inputs`` (N, C, H, W)
    and ``targets`` (N,) (see the module docstring for what runs).

    ``loss_fn`` defaults to ``nn.CrossEntropyLoss()``. ``per_layer=True`` adds per-layer FLOP rows
    (a little slower). ``compare_torch`` also sums torch's ``FlopCounterMode`` formulas over the
    same ops (``flops_torch``). ``analytic=True`` forwards to :func:`analytic_profile` with the
    batch's shapes: no real compute, and the model/optimizer are not touched.
    ``allocator_peak=True`` on CPU runs one extra update under torch.profiler to report the
    allocator's peak including kernel scratch (``memory_peak_allocator``; always set on CUDA).
    Raises ``ValueError`` for a batch the model cannot take, an output that does not fit the loss,
    or an optimizer holding no parameter of the model.
    """
    if analytic:
        from convpeft.profiler.analytic import analytic_profile

        return analytic_profile(model, optimizer, tuple(inputs.shape), targets=targets,
                                loss_fn=loss_fn, warmup=warmup, per_layer=per_layer,
                                compare_torch=compare_torch)
    if warmup < 0 or repeat < 0:
        raise ValueError("warmup and repeat must be >= 0")
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    _check_inputs(model, optimizer, inputs, targets)
    device = inputs.device
    galore = _warm_up(model, optimizer, inputs, targets, loss_fn, warmup)
    tally, mem, t_instr, flops_torch, peak_dev = _instrumented(
        model, optimizer, inputs, targets, loss_fn, per_layer, compare_torch)

    if allocator_peak and device.type == "cpu":
        optimizer.zero_grad(set_to_none=True)
        live = [*model.parameters(), *model.buffers(), *state_tensors(optimizer), inputs, targets]
        peak_dev = allocator_peak_cpu(
            lambda: _update(model, optimizer, inputs, targets, loss_fn), live)

    times, cpu_times = [], []
    for _ in range(repeat):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        _update(model, optimizer, inputs, targets, loss_fn)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return _build(model, optimizer, inputs, tally, mem, t_instr, flops_torch, peak_dev,
                  times, cpu_times, galore, analytic=False)


def _instrumented(model, optimizer, inputs, targets, loss_fn, per_layer, compare_torch):
    """Run ONE update under the instrumentation; return (tally, memory report, (wall s, CPU s),
    torch's FLOPs or None, device peak or None)."""
    device = inputs.device
    param_keys = {storage_key(p) for p in model.parameters()}
    layers = _LayerTracker(model) if per_layer else None
    counter = FlopCounter(param_keys, layer_of=layers.layer_of if layers else None,
                          torch_flops=compare_torch)
    tracker = MemoryTracker()
    tracker.add_existing(model.parameters(), "params")
    tracker.add_existing(model.buffers(), "buffers")
    tracker.add_existing([p.grad for p in model.parameters() if p.grad is not None], "grads")
    tracker.add_existing(state_tensors(optimizer), "optimizer")
    tracker.add_existing([inputs, targets], None)

    def set_phase(ph: str) -> None:
        counter.phase = ph
        if layers is not None:
            layers.phase = ph

    def pack(t: torch.Tensor) -> torch.Tensor:
        tracker.mark_saved(t)
        return t

    grad_records: set[int] = set()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with contextlib.ExitStack() as stack:
            if layers is not None:
                stack.enter_context(layers)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            stack.enter_context(_Instrument(counter, tracker))
            set_phase("forward")
            optimizer.zero_grad(set_to_none=True)
            loss = _forward_loss(model, inputs, targets, loss_fn)
            set_phase("backward")
            loss.backward()
            del loss
            # p.grad storages now: they are gradients even if the optimizer frees them later
            grad_records = tracker.live_grad_records(model)
            set_phase("optimizer")
            optimizer.step()
        _sync(device)
        elapsed = (time.perf_counter() - t0, time.process_time() - c0)
    finally:
        tracker.stop()
    peak_dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    cats = tracker.classify(model, optimizer, extra_grads=grad_records)
    mem = tracker.report(cats)
    flops_torch = counter.tally.torch if compare_torch else None
    if layers is not None:
        counter.tally.layer_kinds = layers.kinds
    return counter.tally, mem, elapsed, flops_torch, peak_dev


def _build(model, optimizer, inputs, tally: FlopTally, mem, t_instr: tuple[float, float],
           flops_torch, peak_dev, times: list[float], cpu_times: list[float], galore: bool,
           analytic: bool) -> UpdateProfile:
    if galore:
        # an ordinary step's projection matmuls were measured; add the SVD refresh amortised
        step_mm = tally.optimizer
        refresh = int(optimizer.projection_refresh_flops())
        gap = max(1, int(optimizer.update_proj_gap))
        flops_opt = step_mm + round(refresh / gap)
        flops_refresh = step_mm + refresh
    else:
        flops_opt = tally.optimizer + tally.optimizer_svd
        flops_refresh = None
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
        flops_torch=flops_torch,
        memory_peak=mem.peak,
        memory_by_category=mem.by_category,
        memory_category_max=mem.category_max,
        memory_baseline=mem.baseline,
        memory_peak_allocator=peak_dev,
        step_time_s=step,
        step_time_iqr_s=iqr,
        instrumented_time_s=t_instr[0],
        step_cpu_time_s=statistics.median(cpu_times) if cpu_times else None,
        instrumented_cpu_time_s=t_instr[1],
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        batch_size=int(inputs.shape[0]),
        input_shape=[int(s) for s in inputs.shape],
        device=str(inputs.device),
        analytic=analytic,
        per_layer=per_layer,
    )
