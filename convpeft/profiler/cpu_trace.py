"""The CPU allocator's peak over an instrumented update, placed on the tracker's op clock.

PyTorch keeps no allocator statistics on the CPU (there is no CPU twin of
``torch.cuda.max_memory_allocated``), but ``torch.profiler`` with ``profile_memory=True`` records
every allocation and free of the CPU allocator, scratch that a kernel allocates and frees inside
itself included (oneDNN reorders, a conv backward's column or blocked-layout buffers). That is
the device's truth on a CPU: what the process's heap must hold.

:class:`CpuTrace` runs the instrumented update under the profiler and brackets every op the
:class:`~convpeft.profiler.engine.Instrument` mode runs with a named record-function marker
(``convpeft#<i>``). After the run, the allocation events are replayed in time order: the running
sum of their sizes is the allocator's live bytes beyond what existed before the trace; its
maximum, plus the storages live when tracking started, is the device peak; the marker enclosing
that moment gives the op, hence the tracker's clock tick, so the tensors live then are the
tracker's to say and the rest is ``scratch``.

The same replay gives each op's *excess*: the highest bytes the op held at once beyond the
storages it returned (kernel scratch). :mod:`.scratch` fits its per-op model to those.

Blocks allocated before the trace starts and freed during it are not reported by the profiler,
so the update must not free pre-existing blocks it did not track: the engine calls
``zero_grad(set_to_none=True)`` before tracking starts for that reason.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

MARKER = "convpeft#"


@dataclass
class OpExcess:
    """One op's allocation profile from the trace: ``name`` (aten op), ``index`` (marker
    number), ``peak`` (highest bytes allocated inside the op at once, outputs included) and
    ``kept`` (bytes still allocated when the op returned: its outputs)."""

    name: str
    index: int
    peak: int
    kept: int

    @property
    def excess(self) -> int:
        """Scratch: bytes held at the op's own peak beyond what it returned."""
        return max(0, self.peak - self.kept)


@dataclass
class TraceResult:
    """The replayed trace: ``peak`` (max running bytes beyond the pre-trace storages),
    ``peak_marker`` (index of the op running then, or of the last op started before it when the
    allocation came from between ops; -1 before any op) and per-op :class:`OpExcess`."""

    peak: int
    peak_marker: int
    ops: list[OpExcess] = field(default_factory=list)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: kineto logs a line to the C-level stderr at every
    profiler start and stop ("profiler_start", a GPU-count error on CPU-only hosts), which would
    interleave with a user's output once per profiled update."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CpuTrace:
    """Context manager profiling the CPU allocator; :meth:`marker` brackets one op."""

    def __init__(self) -> None:
        self.names: list[str] = []  # marker index -> aten op name
        self.ticks: list[int] = []  # marker index -> tracker tick right after the op
        self._prof = None
        self._fast = getattr(torch._C._profiler, "_RecordFunctionFast", None)

    def __enter__(self) -> CpuTrace:
        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # errors only (read at kineto's start)
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with quiet_stderr():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with quiet_stderr():
            self._prof.__exit__(*exc)

    def marker(self, op: object) -> contextlib.AbstractContextManager:
        """A record-function scope named after the next marker index, for one op."""
        self.names.append(str(op))
        name = f"{MARKER}{len(self.names) - 1}"
        if self._fast is not None:
            return self._fast(name)
        return torch.autograd.profiler.record_function(name)

    def set_tick(self, tick: int) -> None:
        """Record the tracker's tick right after the op of the last marker."""
        self.ticks.append(tick)

    def result(self) -> TraceResult:
        """Replay the trace (see the module docstring)."""
        from torch._C._profiler import _EventType

        allocs: list[tuple[int, int, int]] = []  # (time, bytes (+/-), marker index or -1)
        starts: list[tuple[int, int]] = []  # (start time, marker index)
        todo = [(e, -1) for e in self._prof.profiler.kineto_results.experimental_event_tree()]
        while todo:
            e, mark = todo.pop()
            if e.name.startswith(MARKER):
                mark = int(e.name[len(MARKER):])
                starts.append((e.start_time_ns, mark))
            if e.tag == _EventType.Allocation:
                if e.extra_fields.device.type == "cpu":
                    allocs.append((e.start_time_ns, e.extra_fields.alloc_size, mark))
                continue
            todo.extend((c, mark) for c in e.children)
        allocs.sort(key=lambda a: a[0])
        starts.sort()
        run = peak = 0
        peak_mark = -1
        per_op: dict[int, list[int]] = {}  # marker -> [running inside, peak inside]
        j, last = 0, -1  # the last marker started so far (for allocations between ops)
        for t, delta, mark in allocs:
            while j < len(starts) and starts[j][0] <= t:
                last = starts[j][1]
                j += 1
            run += delta
            if run > peak:
                peak, peak_mark = run, (mark if mark >= 0 else last)
            if mark >= 0:
                st = per_op.setdefault(mark, [0, 0])
                st[0] += delta
                st[1] = max(st[1], st[0])
        ops = [OpExcess(self.names[i], i, pk, max(0, cur)) for i, (cur, pk) in
               sorted(per_op.items()) if i < len(self.names)]
        return TraceResult(peak=peak, peak_marker=peak_mark, ops=ops)
