"""What the default run's figures show can be trusted (issue 26, item 4): no accuracy interval
outside 0..100%, no legend over the data, methods with equal values side by side rather than on
top of each other; the Pareto figure marks what the seeds cannot separate. Drawn from a slice of
the committed reference rows (plots/rank_sweep_default.csv), so the real data is checked."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.plots.accuracy import plot_accuracy, plot_pareto  # noqa: E402
from benchmarks.plots.common import _interval_by  # noqa: E402
from benchmarks.plots.flops import plot_flop_counters, plot_flops  # noqa: E402
from benchmarks.sweep.stats import ACCURACY, interval, metric_interval, summarize  # noqa: E402

CSV = Path(__file__).resolve().parents[1] / "plots" / "rank_sweep_default.csv"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with CSV.open(newline="") as f:
        return list(csv.DictReader(f))


def _group(rows, model, task):
    return [r for r in rows if r["model"] == model and r["task"] == task]


def test_bounded_interval_is_cut_to_the_range_and_holds_the_mean():
    plain = interval([1.0, 1.0, 0.6])
    assert plain.high > 1  # what the plain t-interval did (101.4% in an earlier run)
    cut = interval([1.0, 1.0, 0.6], bounds=ACCURACY)
    assert cut.high == 1.0 and cut.low == pytest.approx(plain.low) and cut.mean == plain.mean
    low = interval([0.0, 0.05, 0.4], bounds=ACCURACY)
    assert low.low == 0.0 and low.low <= low.mean <= low.high
    with pytest.raises(ValueError, match="bounds"):
        interval([0.5, 1.2], bounds=ACCURACY)
    # a row metric: cut to its range; values no sweep writes get the plain interval instead
    assert metric_interval([1.0, 1.0, 0.6], "target_acc") == cut
    assert metric_interval([0.95, 1.0, 1.05], "target_acc").high > 1


def test_reference_run_intervals_stay_within_0_and_100(rows):
    for rec in summarize(rows):
        for m in ("target_acc", "source_acc", "zero_shot_acc"):
            lo, hi = rec[f"{m}_ci_low"], rec[f"{m}_ci_high"]
            if lo is not None:
                assert 0 <= lo <= rec[f"{m}_mean"] <= hi <= 1, (rec["method"], m, lo, hi)
    for model in ("mobilenet_v2", "resnet18"):
        for task in ("shift", "new_classes"):
            for iv in _interval_by(_group(rows, model, task), "target_acc").values():
                assert 0 <= iv.low <= iv.high <= 1


def test_legends_are_beside_the_data(rows):
    grp = _group(rows, "resnet18", "new_classes")
    for fig in (plot_accuracy(grp, "resnet18", "digits", "new_classes"),
                plot_pareto(grp, "resnet18", "digits", "new_classes"),
                plot_flops(grp, "resnet18", "digits", "new_classes")):
        ax = fig.axes[0]
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        assert not ax.get_legend().get_window_extent(r).overlaps(ax.get_window_extent(r))
        plt.close(fig)
    fig = plot_flop_counters(rows)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in fig.axes:  # legend inside, but above every bar
        leg = ax.get_legend().get_window_extent(r)
        for p in ax.patches:
            assert not p.get_window_extent(r).overlaps(leg), ax.get_title()
    plt.close(fig)


def test_equal_methods_are_drawn_side_by_side(rows):
    """LoRA and DoRA share values at some ranks in places; their markers sit at different x."""
    grp = _group(rows, "resnet18", "shift")
    fig = plot_accuracy(grp, "resnet18", "digits", "shift")
    xs = {}
    for c in fig.axes[0].containers:  # one errorbar container per ranked method
        if c.get_label() in ("LoRA", "DoRA", "GaLore"):
            xs[c.get_label()] = tuple(c.lines[0].get_xdata())
    assert len(xs) == 3 and len(set(xs.values())) == 3
    plt.close(fig)


def test_pareto_marks_what_the_seeds_cannot_separate(rows):
    # ResNet18 shift: the reference's seeds separate few configurations from the best there
    grp = _group(rows, "resnet18", "shift")
    fig = plot_pareto(grp, "resnet18", "digits", "shift")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Pareto front of the means" in labels
    assert any(lab.startswith("not separable from") for lab in labels)
    plt.close(fig)


def test_pareto_keeps_sparse_updates_apart_and_draws_the_published_ratios(rows):
    # the reference rows with a copy of LoRA's marked as trained on the last 4 blocks only,
    # at half the memory and 10 points less: it must be its own point, not averaged into LoRA's
    grp = _group(rows, "resnet18", "new_classes")
    sparse = [dict(r, update_blocks="4",
                   cost_memory_peak=str(float(r["cost_memory_peak"]) / 2),
                   target_acc=str(max(0.0, float(r["target_acc"]) - 0.1)))
              for r in grp if r["method"] == "lora"]
    fig = plot_pareto(grp + sparse, "resnet18", "digits", "new_classes")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lab.startswith("TinyTL") for lab in labels)
    assert any(lab.startswith("Back Razor") for lab in labels)
    # the exact floor of LoRA on every layer at the size the costs are drawn at (the
    # deployment size, ImageNet stem), where update_floor puts it
    from benchmarks.lean_memory import update_floor
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model

    r0 = next(r for r in grp if r["method"] == "lora")
    net = build_model("resnet18", 10, small_input=False)
    opt = prepare(net, MethodConfig("lora", rank=int(r0["rank"]))).optimizer
    res = int(r0["cost_resolution"])
    floor = update_floor(net, opt, (int(r0["cost_batch"]), 3, res, res))["floor"] / 2**20
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("exact floor"))
    assert line.get_xdata()[0] == pytest.approx(floor)
    n_lora = len({r["rank"] for r in grp if r["method"] == "lora"})
    lora_pts = [c for c in ax.collections if c.get_label() == "LoRA"]
    assert sum(len(c.get_offsets()) for c in lora_pts) == 2 * n_lora
    # without sparse rows the published ratios are not drawn (nothing there compares to them)
    plain = plot_pareto(grp, "resnet18", "digits", "new_classes")
    assert not any(t.get_text().startswith("TinyTL")
                   for t in plain.axes[0].get_legend().get_texts())
    plt.close(fig)
    plt.close(plain)
