"""Smoke test of the adapter benchmark's machinery (tiny sizes; no timing assertions)."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import adapter_speed
from convpeft.profiler.memory import MemoryTracker, tensor_peak


def test_storage_tracker_sees_saved_activations():
    """An activation kept alive for backward raises the peak by at least its size (the
    benchmark measures peaks with the profiler's tracker, ``tensor_peak``)."""
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)

    def step() -> None:
        y = torch.tanh(x @ w)  # tanh saves its (256, 64) output
        y.sum().backward()
        w.grad = None

    tracker = MemoryTracker()
    tracker.add_existing([w, x, w, x.view(-1)], None)  # what exists before counts once
    baseline = tracker.current
    assert baseline == (64 * 64 + 256 * 64) * 4
    assert tensor_peak(step, [w, x]) >= baseline + 2 * 256 * 64 * 4  # x @ w and tanh's output


def test_run_returns_rows_with_ratios(monkeypatch):
    monkeypatch.setattr(adapter_speed, "_build", lambda name: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))
    threads = torch.get_num_threads()
    try:
        rows = adapter_speed.run(("tiny",), steps=2, warmup=1, batch=4, size=8, threads=1,
                                 configs=("peft-lora", "convpeft-lora", "peft-dora",
                                          "convpeft-dora", "convpeft-dora-conv"))
    finally:
        torch.set_num_threads(threads)
    by = {r.config: r for r in rows}
    assert set(by) == {"peft-lora", "convpeft-lora", "peft-dora", "convpeft-dora",
                       "convpeft-dora-conv"}
    assert by["convpeft-lora"].versus == "peft-lora" and by["convpeft-lora"].bar_time == 1.05
    assert by["convpeft-lora"].trainable_params == by["peft-lora"].trainable_params
    assert by["convpeft-dora-conv"].trainable_params > by["convpeft-dora"].trainable_params
    assert all(r.peak_mib > 0 and r.time_s > 0 for r in rows)
    assert "convpeft-dora" in adapter_speed.format_rows(rows)
