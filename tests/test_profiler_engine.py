"""The instrumented-update engine: device peak and workspace bookkeeping (with an injected
allocator reading, so it runs without a GPU), the refresh protocol, one-way imports."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch import nn

from convpeft.profiler import SCRATCH, RefreshingOptimizer, profile_update
from convpeft.profiler.engine import check_inputs, run_instrumented, warm_up
from convpeft.profiler.memory import CATEGORIES, storage_key

PROFILER = pathlib.Path(__file__).resolve().parents[1] / "convpeft" / "profiler"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


class ScriptedAllocator:
    """An allocator reading for tests: ``current()`` is the bytes of ``held`` tensors plus
    ``foreign`` bytes that belong to someone else; ``peak()`` after the ``spike_at``-th reset
    reports ``spike`` bytes (plus ``foreign``), every other op ``quiet`` bytes (plus
    ``foreign``)."""

    def __init__(self, held: list[torch.Tensor], foreign: int, spike: int, spike_at: int,
                 quiet: int = 0) -> None:
        keys = {storage_key(t): t.untyped_storage().nbytes() for t in held}
        self.held = sum(keys.values())
        self.foreign, self.spike, self.spike_at, self.quiet = foreign, spike, spike_at, quiet
        self.resets = 0

    def reset_peak(self) -> None:
        self.resets += 1

    def peak(self) -> int:
        return self.foreign + (self.spike if self.resets == self.spike_at else self.quiet)

    def current(self) -> int:
        return self.foreign + self.held


def _setup():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    held = [*model.parameters(), *model.buffers(), x, y]
    return model, opt, x, y, held


@pytest.mark.parametrize("spike_at", [3, 10, 20])
def test_device_peak_above_tensors_gains_a_workspace_category(spike_at):
    model, opt, x, y, held = _setup()
    probe = ScriptedAllocator(held, foreign=10**9, spike=50 * 2**20, spike_at=spike_at)
    run = run_instrumented(model, opt, x, y, nn.CrossEntropyLoss(), probe=probe)
    mem = run.memory
    # the peak is the device's reading for this update: other tensors (foreign) do not count
    assert run.device_peak.raw == 10**9 + 50 * 2**20
    assert mem.peak == 50 * 2**20
    assert set(mem.by_category) == {*CATEGORIES, SCRATCH}
    assert sum(mem.by_category.values()) == mem.peak
    tensors = mem.peak - mem.by_category[SCRATCH]
    assert 0 < tensors < mem.peak
    # what was live at the device's peak includes the parameters and the batch
    assert mem.by_category["params"] == sum(p.numel() * 4 for p in model.parameters())


def test_device_peak_below_tensors_keeps_the_tensor_peak_with_zero_workspace():
    model, opt, x, y, held = _setup()
    plain = run_instrumented(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), x, y,
                             nn.CrossEntropyLoss())
    probe = ScriptedAllocator(held, foreign=123, spike=1, spike_at=2)
    run = run_instrumented(model, opt, x, y, nn.CrossEntropyLoss(), probe=probe)
    assert run.memory.by_category[SCRATCH] == 0
    assert run.memory.peak == plain.memory.peak
    assert sum(run.memory.by_category.values()) == run.memory.peak


def test_cpu_tensor_level_profile_has_no_scratch_category():
    model, opt, x, y, _ = _setup()
    p = profile_update(model, opt, x, y, repeat=0, compare_torch=False, allocator_peak=False)
    assert set(p.memory_by_category) == set(CATEGORIES)
    assert p.memory_peak_allocator is None and p.memory_model == "tensor-level"
    assert p.memory_peak == p.memory_peak_tensors


class _Refreshing(torch.optim.SGD):
    """A minimal optimizer with a periodic refresh: every 3rd step 'refreshes' (1000 FLOPs)."""

    update_proj_gap = 3

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.1)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)

    def refreshes_next_step(self) -> bool:
        return self.steps % self.update_proj_gap == 0

    def projection_refresh_flops(self) -> int:
        return 1000


def test_any_optimizer_with_the_refresh_protocol_is_amortised():
    model, _, x, y, _ = _setup()
    opt = _Refreshing(model.parameters())
    assert isinstance(opt, RefreshingOptimizer)
    assert not isinstance(torch.optim.SGD(model.parameters(), lr=0.1), RefreshingOptimizer)
    # warm-up steps past the refresh, so the measured step is an ordinary one
    assert warm_up(model, opt, x, y, nn.CrossEntropyLoss(), warmup=0) is True
    assert not opt.refreshes_next_step()
    p = profile_update(model, opt, x, y, warmup=0, repeat=0, compare_torch=False)
    assert p.flops_optimizer == round(1000 / 3)
    assert p.flops_optimizer_refresh == 1000


def test_check_inputs_names_the_problem():
    model, opt, x, y, _ = _setup()
    with pytest.raises(ValueError, match="same .*batch dimension"):
        check_inputs(model, opt, x, y[:2])


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions included
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.rsplit(".", 1)[-1] if node.module.startswith("convpeft.profiler")
                      else node.module)
    return names


def test_profiler_imports_run_one_way():
    """engine <- analytic <- profile: neither lower module imports a higher one."""
    assert not {"profile", "analytic"} & _imports(PROFILER / "engine.py")
    assert "profile" not in _imports(PROFILER / "analytic.py")


def test_ops_that_allocate_nothing_are_not_probed():
    """Views, in-place and out= ops return an alias of an input: no storage, no scratch, so
    the engine neither resets nor reads the allocator around them (a CUDA read costs more
    than the op)."""
    from convpeft.profiler.memory import MemoryTracker

    aten = torch.ops.aten
    tracker = MemoryTracker()
    assert tracker.returns_alias(aten.view.default)
    assert tracker.returns_alias(aten.add_.Tensor)
    assert tracker.returns_alias(aten.add.out)
    assert not tracker.returns_alias(aten.add.Tensor)
    assert not tracker.returns_alias(aten.convolution.default)
    tracker.stop()
    model, opt, x, y, held = _setup()
    counted = ScriptedAllocator(held, foreign=0, spike=0, spike_at=-1)
    run_instrumented(model, opt, x, y, nn.CrossEntropyLoss(), probe=counted)
    total = ScriptedAllocator(held, foreign=0, spike=0, spike_at=-1)
    from convpeft.profiler import engine

    class _ProbeAll(engine.Instrument):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            total.reset_peak()
            return func(*args, **(kwargs or {}))

    model2, opt2, x2, y2, _ = _setup()
    with _ProbeAll(None, None):
        nn.CrossEntropyLoss()(model2(x2), y2).backward()
        opt2.step()
    assert 0 < counted.resets < total.resets


def test_cuda_probe_reads_the_nested_allocator_statistics(monkeypatch):
    from convpeft.profiler.engine import CudaProbe

    stats = {"allocated_bytes": {"all": {"current": 1000, "peak": 5000}}}
    calls = []
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda d: stats)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    probe = CudaProbe(torch.device("cuda", 0))
    probe.reset_peak()
    assert calls == [torch.device("cuda", 0)]
    assert (probe.current(), probe.peak()) == (1000, 5000)
