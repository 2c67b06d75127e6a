"""Accuracy plots: what adaptation achieves over rank, and what it costs in memory.

``accuracy_<model>_<task>`` (:func:`plot_accuracy`) is the rank figure of target accuracy, with
zero-shot (no update) as the floor; ``pareto_<model>_<task>`` (:func:`plot_pareto`) puts each
configuration's accuracy against its peak memory and marks the Pareto front of the means
(:func:`pareto_front`). Both show means over seeds with 95% t-intervals
(:func:`benchmarks.stats.interval`); one seed draws none. Profile-only rows have no accuracy,
so both return None for them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import matplotlib.pyplot as plt

from benchmarks.common import MIB, method_label, num
from benchmarks.plot_common import _interval_by, _mean_by, _rank_figure, _style, _title
from benchmarks.stats import interval


def _seed_counts(ivs: dict) -> str:
    ns = sorted({iv.n for iv in ivs.values()})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"mean over {n} seed(s)" + (", 95% t-interval" if ns[-1] > 1 else "")


def _clamp_percent(ax) -> None:
    """Keep an accuracy axis within 0..100% (a wide interval over few seeds may reach past
    them; its bar is then cut at the frame, the interval itself is unchanged)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -2.0), min(hi, 102.0))


def plot_accuracy(rows, model, dataset, task) -> plt.Figure | None:
    """Rank vs target accuracy (mean over seeds, 95% interval bars); zero-shot (no update) and
    the no-rank methods (full FT, ...) as reference lines with their interval as a band."""
    ivs = _interval_by(rows, "target_acc")
    if not ivs:
        return None
    acc = {k: iv.mean for k, iv in ivs.items()}
    fig, ax = _rank_figure(rows, acc, lambda v: 100 * v, intervals=ivs)
    # one zero-shot value per (source model, seed): the mean over seeds of the group's value
    zs_by_seed: dict = defaultdict(list)
    for r in rows:
        v = num(r.get("zero_shot_acc"))
        if v is not None:
            zs_by_seed[r.get("seed")].append(v)
    if zs_by_seed:
        zs = interval([sum(v) / len(v) for v in zs_by_seed.values()])
        ax.axhline(100 * zs.mean, color="gray", ls=(0, (1, 3)), lw=2,
                   label="zero-shot (no update)")
        if zs.low is not None:
            ax.axhspan(100 * zs.low, 100 * zs.high, color="gray", alpha=0.1, lw=0)
    ax.set_ylabel(f"target test accuracy [%]\n({_seed_counts(ivs)})")
    _clamp_percent(ax)
    ax.set_title(f"Accuracy after adaptation\n{_title(model, dataset, task)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated under (lower memory, higher accuracy), sorted by
    memory. A point is dominated if another has memory <= and accuracy >=, one strictly."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows, model, dataset, task) -> plt.Figure | None:
    """Mean target accuracy (95% interval bars) vs peak memory per configuration; the Pareto
    front of the means marked."""
    acc = _interval_by(rows, "target_acc")
    mem = _mean_by(rows, "memory_peak")
    keys = [k for k in acc if k in mem]
    if not keys:
        return None
    pts = [(mem[k] / MIB, 100 * acc[k].mean) for k in keys]
    labels = [method_label(m) + ("" if r is None else f" r{r}") for m, r in keys]
    methods = [m for m, _ in keys]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in dict.fromkeys(methods):
        idx = [i for i, mm in enumerate(methods) if mm == m]
        st = _style(m)
        ax.scatter([pts[i][0] for i in idx], [pts[i][1] for i in idx], label=method_label(m),
                   color=st.get("color"), marker=st.get("marker") or "D", s=36, zorder=3)
        bars = [(i, acc[keys[i]]) for i in idx if acc[keys[i]].low is not None]
        if bars:
            ax.errorbar([pts[i][0] for i, _ in bars], [pts[i][1] for i, _ in bars],
                        yerr=[[pts[i][1] - 100 * iv.low for i, iv in bars],
                              [100 * iv.high - pts[i][1] for i, iv in bars]],
                        fmt="none", ecolor=st.get("color"), capsize=2, lw=1, zorder=2)
    front = pareto_front(pts)
    ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="red",
            lw=1.2, zorder=2, label="Pareto front")
    for i in front:
        ax.annotate(labels[i], pts[i], textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color="red")
    ax.set_xlabel("peak memory of one update [MiB]")
    ax.set_ylabel(f"target test accuracy [%]\n({_seed_counts(acc)})")
    _clamp_percent(ax)
    ax.set_title(f"Accuracy vs memory (up-left is better)\n{_title(model, dataset, task)}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
