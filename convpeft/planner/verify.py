"""``--verify``: run the planned update on the device and step down until it really fits.

A plan is a prediction; the device has the last word. :func:`verify_row` builds the planned
configuration for real on the device (random weights, a random batch), runs one warm-up update
(so the optimizer state exists) and reads the allocator's peak over the next one, independently
of the profiler's tracker:

* CPU: the allocator's peak from torch.profiler's allocation trace of that update, on top of the
  storages live when it starts (:func:`convpeft.profiler.memory.allocator_peak_cpu`);
* CUDA: ``torch.cuda.max_memory_reserved()`` over the warm-up and the update, after
  ``empty_cache()`` and ``reset_peak_memory_stats()`` (what the caching allocator takes from the
  device, fragmentation included), with ``max_memory_allocated()`` beside it.

While the measured peak exceeds the budget the batch steps down (by the measured overshoot, at
least one); once it fits, the next batch up is measured too, so the row says whether the plan left
a fitting batch unused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_TRIES = 8


@dataclass
class Verification:
    """What real updates measured for one planned row: ``batch`` (the largest batch measured to
    fit, 0 if none), ``fits``, ``criterion`` (what was compared with the budget), ``measured``
    (batch -> that peak in bytes) and ``allocated`` (batch -> allocated bytes; the same as
    ``measured`` on the CPU), ``next_fits`` (whether ``batch + 1`` fits too; None if not run),
    ``steps`` (how often the batch stepped down: 0 when the plan held)."""

    batch: int
    fits: bool
    criterion: str
    measured: dict[int, int] = field(default_factory=dict)
    allocated: dict[int, int] = field(default_factory=dict)
    next_fits: bool | None = None
    steps: int = 0


def measure_peak(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int,
                 resolution: int, num_classes: int, device: str) -> tuple[int, int]:
    """(criterion peak, allocated peak) in bytes of one real update at ``batch`` on ``device``
    (see the module docstring)."""
    from convpeft.profiler.engine import plain_update
    from convpeft.profiler.memory import allocator_peak_cpu, state_tensors

    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    if device == "cuda":
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        plain_update(model, optimizer, x, y, loss_fn)
        plain_update(model, optimizer, x, y, loss_fn)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    plain_update(model, optimizer, x, y, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    live = [*model.parameters(), *model.buffers(), *state_tensors(optimizer), x, y]
    peak = allocator_peak_cpu(lambda: plain_update(model, optimizer, x, y, loss_fn), live)
    return peak, peak


def verify_row(start: int, build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]],
               *, budget: int, resolution: int, min_batch: int = 1, probe_next: bool = True,
               device: str, num_classes: int = 10) -> Verification:
    """Measure a planned batch ``start`` on ``device`` and step down (not below ``min_batch``)
    while its peak exceeds ``budget`` bytes (module docstring); ``probe_next``: once a batch
    fits, measure the next one up too (a plan that searched, uncapped). ``build()`` returns a
    fresh model and optimizer on ``device``. It takes the row's figures, not the
    :class:`~convpeft.planner.PlanRow`, so the planner imports it and not the other way round."""
    criterion = ("torch.cuda.max_memory_reserved" if device == "cuda"
                 else "CPU allocator trace")
    v = Verification(batch=0, fits=False, criterion=criterion)
    n = max(start, min_batch)
    for _ in range(MAX_TRIES):
        model, opt = build()
        try:
            peak, alloc = measure_peak(model, opt, n, resolution, num_classes, device)
        finally:
            del model, opt
        v.measured[n], v.allocated[n] = peak, alloc
        if peak <= budget:
            v.batch, v.fits = n, True
            break
        if n <= min_batch:
            break
        v.steps += 1
        n = max(min_batch, min(n - 1, int(n * budget / peak)))
    if v.fits and probe_next:
        # does the next batch up fit too? (measured already if the plan stepped down past it)
        up = v.batch + 1
        if up not in v.measured:
            model, opt = build()
            peak, alloc = measure_peak(model, opt, up, resolution, num_classes, device)
            del model, opt
            v.measured[up], v.allocated[up] = peak, alloc
        v.next_fits = v.measured[up] <= budget
    return v
