"""Findings and memory plots with plain, lean and checkpointed rows in one results file."""

from __future__ import annotations

import pytest

from benchmarks.common import MIB, variant_of
from benchmarks.plots.make import plot_memory
from benchmarks.sweep.findings import findings_markdown, lean_savings, memory_savings


def _row(method: str, peak_mib: float, bn: str = "freeze", rank: int | None = None,
         lean: bool | None = None, ckpt: bool | None = None) -> dict:
    r = {"status": "ok", "model": "resnet18", "dataset": "digits", "task": "shift",
         "method": method, "rank": rank, "bn": bn, "memory_peak": peak_mib * MIB,
         "memory_by_category_params": 10 * MIB, "memory_by_category_activations":
         (peak_mib - 10) * MIB, "flops_forward": 1, "flops_backward": 1}
    if lean is not None:  # rows from before the columns existed have neither
        r["lean"], r["checkpoint"] = lean, bool(ckpt)
    return r


ROWS = [_row("full", 100.0, bn="train"), _row("full", 80.0, bn="freeze", lean=False),
        _row("lora", 70.0, rank=4), _row("lora", 40.0, rank=4, lean=True),
        _row("lora", 30.0, rank=4, lean=True, ckpt=True)]


def test_variant_of() -> None:
    assert [variant_of(r) for r in ROWS] == ["plain", "plain", "plain", "lean", "lean + ckpt"]


def test_claims_use_plain_rows_and_lean_rows_are_compared_both_ways() -> None:
    md = findings_markdown(ROWS)
    recs = {(r["variant"]): r for r in lean_savings(ROWS)}
    assert recs["lean"]["saving_bn_train"] == pytest.approx(0.6)
    assert recs["lean"]["saving_bn_frozen"] == pytest.approx(0.5)
    assert recs["lean + ckpt"]["saving_bn_train"] == pytest.approx(0.7)
    assert "| resnet18 | shift | LoRA | 4 | freeze | lean + ckpt | 30.0 | 70.0% | 62.5% |" in md
    # claim 1 compares the plain LoRA row with a plain full-FT row, never a lean one
    plain = [r for r in ROWS if variant_of(r) == "plain"]
    assert [m["peak"] / MIB for m in memory_savings(plain) if m["method"] == "lora"] == [70.0]
    assert "## 3. Lean and checkpointed updates" not in findings_markdown(ROWS[:3])


def test_no_frozen_reference_says_na() -> None:
    md = findings_markdown([ROWS[0], ROWS[3]])
    assert "| 40.0 | 60.0% | n/a |" in md


def test_memory_plot_marks_lean_and_checkpointed_peaks() -> None:
    fig = plot_memory(ROWS, "resnet18", "digits", "shift")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"lean peak", "lean + ckpt peak", "full FT peak"} <= labels
    offsets = [c.get_offsets() for ax in fig.axes for c in ax.collections]
    heights = sorted(float(o[0][1]) for o in offsets if len(o))
    assert heights == [30.0, 40.0]
    only_lean = plot_memory([ROWS[3]], "resnet18", "digits", "shift")
    assert "(lean)" in only_lean._suptitle.get_text()
