"""Simultaneous peak memory of a training update, tracked per storage and split by category.

Every tensor's bytes live in an untyped storage. :class:`MemoryTracker` registers the storages
that exist before the update (parameters, buffers, gradients, optimizer state, the batch) and
every storage an aten op returns during it; a ``weakref.finalize`` on the storage's Python object
(torch keeps that object alive exactly as long as the C++ storage) tells us when it is freed. The
running sum of live bytes gives the *true simultaneous* peak, and the set of storages live at that
moment gives the breakdown. Nothing is hooked on parameters, so frozen parameters are fine
(torch's ``MemTracker`` registers gradient hooks and raises on them).

Categories, decided at the end of the update by identity, first match wins:

==============  ===========================================================================
``params``      storages of ``model.parameters()``
``buffers``     storages of ``model.buffers()`` (BN running stats)
``grads``       storages that are (or were, before ``zero_grad``) some ``p.grad``
``optimizer``   tensors in ``optimizer.state`` (moments, GaLore projections, step counters)
``activations`` storages saved for backward (``saved_tensors_hooks``), the input batch included
``temporaries`` everything else: outputs of ops that die within the step, upstream gradients
==============  ===========================================================================

Storage ids are ``untyped_storage()._cdata`` (the C++ StorageImpl address), which also works for
meta tensors, so the analytic mode runs the very same tracker without any data.
Only storages returned by aten ops are seen: scratch space a kernel allocates and frees inside
itself (e.g. oneDNN reorders) is not; the device's peak adds it (:mod:`.cpu_trace` on the CPU,
the allocator probe of :mod:`.engine` on CUDA, :mod:`.scratch` when predicted).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convpeft.core.accounting import (  # re-exported: the profiler's public names
    state_bytes as state_bytes,
)
from convpeft.core.accounting import state_tensors, storage_key
from convpeft.core.accounting import untyped_storage_key as _key

CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations", "temporaries")
#: where the device's allocator is read (the CPU trace, CUDA) or predicted (analytic), the bytes
#: beyond the tensors live at the device's peak: kernel scratch that an op allocates and frees
#: inside itself (oneDNN's blocked-layout copies on the CPU, cuDNN/cuBLAS workspaces on CUDA)
SCRATCH = "scratch"


@dataclass
class MemoryReport:
    """Result of one tracked update; all figures in bytes."""

    peak: int
    by_category: dict[str, int]  # live at the peak
    category_max: dict[str, int]  # each category's own maximum over the update (not simultaneous)
    baseline: int  # live when tracking started (params, buffers, state, batch, ...)
    num_storages: int  # storages seen


class MemoryTracker:
    """Per-storage live-byte tracker; feed it op outputs with :meth:`on_output`.

    Records are ``[nbytes, alloc_index, free_index]``; every allocation or free advances a
    counter, so the peak is an index and the storages live at it are those allocated at or before
    it and freed after it. That keeps the per-op cost O(outputs) with no snapshot copying.
    """

    def __init__(self) -> None:
        self._live: dict[int, int] = {}  # storage key -> record id
        self._records: list[list[int]] = []  # [nbytes, alloc_idx, free_idx (-1 while live)]
        self._keys: list[int] = []  # record id -> storage key
        self._cat: dict[int, str] = {}  # record id -> category known at registration
        self._saved: set[int] = set()  # record ids saved for backward
        self._refs: list[weakref.ref] = []
        # id(op) -> (returns a view/alias of an input, op)
        self._alias: dict[int, tuple[bool, object]] = {}
        self._t = 0
        self.current = 0
        self.peak = 0
        self.peak_t = 0
        self.active = True

    # -- registration ---------------------------------------------------------------------------
    def _register(self, t: torch.Tensor, category: str | None, preexisting: bool) -> int | None:
        s = t.untyped_storage()
        return self._register_storage(s, _key(s), category, preexisting)

    def _register_storage(self, s: torch.UntypedStorage, key: int, category: str | None,
                          preexisting: bool) -> int | None:
        rid = self._live.get(key)
        if rid is not None:
            if category is not None:
                self._cat.setdefault(rid, category)
            return rid
        nbytes = s.nbytes()
        if nbytes == 0:
            return None
        rid = len(self._records)
        self._records.append([nbytes, -1 if preexisting else self._t, -1])
        self._keys.append(key)
        self._live[key] = rid
        if category is not None:
            self._cat[rid] = category
        # a plain weakref callback is cheaper than weakref.finalize; keep the ref alive
        self._refs.append(weakref.ref(s, self._free_callback(key, rid)))
        if not preexisting:
            self._t += 1
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_t = self._t
        return rid

    def add_existing(self, tensors: Iterable[torch.Tensor], category: str | None) -> None:
        """Register storages alive before tracking starts (``category`` may be None: decided
        at the end, e.g. the batch becomes an activation if saved for backward)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._register(t, category, preexisting=True)

    def on_output(self, out: object, func: object = None) -> None:
        """Register the storages of an op's outputs that are new (views and in-place results
        share a storage already tracked and are skipped)."""
        if isinstance(out, torch.Tensor):
            outs = (out,)
        elif isinstance(out, (tuple, list)):
            outs = out if all(not isinstance(o, (tuple, list, dict)) for o in out) else \
                tree_flatten(out)[0]
        else:
            return
        for t in outs:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = _key(s)
                if key in self._live:
                    continue
                # a view/alias of something we never registered existed before the update
                pre = func is not None and self.returns_alias(func)
                self._register_storage(s, key, None, pre)

    def returns_alias(self, func: object) -> bool:
        """Does aten op ``func`` return a view or alias of an input (a view op, an in-place or
        ``out=`` op)? Such an op allocates no new storage. Cached per op."""
        # keyed by id: an OpOverload hashes in Python; the entry keeps func alive
        hit = self._alias.get(id(func))
        if hit is None:
            schema = getattr(func, "_schema", None)
            hit = self._alias[id(func)] = (bool(getattr(func, "is_view", False) or (
                schema is not None and any(r.alias_info is not None for r in schema.returns))),
                func)
        return hit[0]

    def mark_saved(self, t: torch.Tensor) -> None:
        """Called from the ``saved_tensors_hooks`` pack hook: ``t`` is kept for backward."""
        rid = self._register(t, None, preexisting=True)
        if rid is not None:
            self._saved.add(rid)

    def _on_free(self, key: int, rid: int) -> None:
        if not self.active:
            return
        rec = self._records[rid]
        if rec[2] != -1:
            return
        if self._live.get(key) == rid:
            del self._live[key]
        rec[2] = self._t
        self._t += 1
        self.current -= rec[0]

    def _free_callback(self, key: int, rid: int):
        def cb(_ref: weakref.ref) -> None:
            self._on_free(key, rid)
        return cb

    def stop(self) -> None:
        """Stop tracking frees (records stay for :meth:`report`)."""
        self.active = False
        self._refs.clear()

    # -- results --------------------------------------------------------------------------------
    def classify(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 extra_grads: Iterable[int] = ()) -> dict[int, str]:
        """Category of every record (see the module docstring for the rules)."""
        by_key: dict[str, set[int]] = {c: set() for c in CATEGORIES}
        by_key["params"] = {storage_key(p) for p in model.parameters()}
        by_key["buffers"] = {storage_key(b) for b in model.buffers()}
        by_key["grads"] = {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
        if optimizer is not None:
            by_key["optimizer"] = {storage_key(t) for t in state_tensors(optimizer)}
        out: dict[int, str] = {}
        for rid in range(len(self._records)):
            cat = self._cat.get(rid)
            if cat is None and self._records[rid][2] == -1:
                key = self._keys[rid]  # still live: its storage key is still its identity
                for c in ("params", "buffers", "grads", "optimizer"):
                    if key in by_key[c]:
                        cat = c
                        break
            if cat is None and rid in extra_grads:
                cat = "grads"
            if cat is None:
                cat = "activations" if rid in self._saved else "temporaries"
            out[rid] = cat
        return out

    def live_grad_records(self, model: torch.nn.Module) -> set[int]:
        """Record ids of the current ``p.grad`` storages (call right after backward, before the
        optimizer may free/replace them)."""
        keys = {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
        return {self._live[k] for k in keys if k in self._live}

    @property
    def tick(self) -> int:
        """The clock now: every registration or free advances it by one."""
        return self._t

    def live_at(self, tick: int) -> int:
        """Bytes of the storages live just before clock tick ``tick``."""
        return sum(n for n, t0, t1 in self._records if t0 < tick and (t1 == -1 or t1 >= tick))

    def report(self, categories: dict[int, str], *, at: int | None = None,
               workspace: int | None = None) -> MemoryReport:
        """Peak, live-at-peak breakdown and per-category maxima from the recorded timeline.

        By default the peak is the tensor-level one. With ``at`` (a clock tick) and
        ``workspace`` (bytes an allocator held beyond the tensors then), the peak is that moment
        instead: the breakdown is what was live at ``at`` plus a ``workspace`` category, so the
        categories still sum to the peak."""
        peak_t = self.peak_t if at is None else at
        by_cat = dict.fromkeys(CATEGORIES, 0)
        events: list[tuple[int, int, str, int]] = []  # (time, order, category, delta)
        baseline = 0
        for rid, (nbytes, t0, t1) in enumerate(self._records):
            cat = categories[rid]
            # the peak lies between clock ticks peak_t - 1 and peak_t: live there means
            # allocated before it (or pre-existing, t0 == -1) and not freed before it
            if t0 < peak_t and (t1 == -1 or t1 >= peak_t):
                by_cat[cat] += nbytes
            if t0 == -1:
                baseline += nbytes
            else:
                events.append((t0, 1, cat, nbytes))
            if t1 != -1:
                events.append((t1, 0, cat, -nbytes))
        events.sort()
        cur = dict.fromkeys(CATEGORIES, 0)
        for rid, (nbytes, t0, _) in enumerate(self._records):
            if t0 == -1:
                cur[categories[rid]] += nbytes
        cmax = dict(cur)
        for _, _, cat, d in events:
            cur[cat] += d
            cmax[cat] = max(cmax[cat], cur[cat])
        peak = self.peak
        if workspace is not None:
            by_cat[SCRATCH] = cmax[SCRATCH] = workspace
            peak = sum(by_cat.values())
        return MemoryReport(peak=peak, by_category=by_cat, category_max=cmax,
                            baseline=baseline, num_storages=len(self._records))


class _TrackOutputs(TorchDispatchMode):
    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracker.on_output(out, func)
        return out


def tensor_peak(run: Callable[[], None], live_before: Iterable[torch.Tensor]) -> int:
    """Simultaneous peak of live storage bytes while ``run()`` executes, counting the storages of
    ``live_before`` (what exists when it starts) -- the tensor-level figure of
    :func:`~convpeft.profiler.profile_update` for any callable, without categories or FLOPs."""
    tracker = MemoryTracker()
    tracker.add_existing(live_before, None)
    try:
        with _TrackOutputs(tracker):
            run()
    finally:
        tracker.stop()
    return tracker.peak


def allocator_peak_cpu(run: Callable[[], None], live_before: Iterable[torch.Tensor]) -> int:
    """Peak bytes of the CPU allocator while ``run()`` executes, on top of the storages of
    ``live_before`` (what is live when it starts), from torch.profiler's allocation trace.

    Unlike :class:`MemoryTracker` this includes scratch that kernels allocate and free inside one
    op (e.g. CPU conv-backward buffers), but it needs a real run and costs a profiled update.
    Blocks allocated before the trace starts and freed during it are not reported by the
    profiler, so call it right after ``zero_grad(set_to_none=True)``.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    storages = {storage_key(t): t.untyped_storage().nbytes()
                for t in live_before if isinstance(t, torch.Tensor)}
    from convpeft.profiler.cpu_trace import quiet_stderr

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():
        prof.__enter__()
    try:
        run()
    finally:
        with quiet_stderr():
            prof.__exit__(None, None, None)
    deltas: list[tuple[int, int]] = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            deltas.append((e.start_time_ns, e.extra_fields.alloc_size))
        todo.extend(e.children)
    deltas.sort()
    run_sum = peak = 0
    for _, d in deltas:
        run_sum += d
        peak = max(peak, run_sum)
    return sum(storages.values()) + peak
