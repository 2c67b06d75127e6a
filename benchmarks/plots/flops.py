"""FLOP plots: what one update costs over rank, and how our count compares with torch's.

``flops_<model>_<task>`` (:func:`plot_flops`) is the rank figure of ``flops_total`` (forward,
backward and optimizer, our count). ``flop_counters`` (:func:`plot_flop_counters`, across
models) sets our forward + backward count beside torch's ``FlopCounterMode`` for the same
updates: torch over-counts the weight gradients of grouped and depthwise convs, so the ratio
is the point of the plot, shown per model next to a standard net. GaLore is left out there: its
optimizer matmuls are outside our forward + backward figure but partly inside torch's.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from benchmarks.common import method_label, num
from benchmarks.plots.common import (
    METHOD_STYLE,
    _flops_scale,
    _mean_by,
    _rank_figure,
    _style,
    _title,
    cost_field,
    legend,
    uses_costs,
)


def _size(rows) -> str:
    """The batch and image size the FLOPs are counted at (the deployment size where the rows
    carry costs there)."""
    r = rows[0]
    if uses_costs(rows):
        r = next(x for x in rows if num(x.get("cost_flops_total")) is not None)
        res = r.get("cost_resolution")
        return f"batch {r.get('cost_batch')} x {res}x{res}"
    return (f"batch {r.get('batch_size')} x {r.get('resolution')}x{r.get('resolution')}, the "
            "training size")


def plot_flops(rows, model, dataset, task) -> plt.Figure | None:
    """Rank vs FLOPs of one update (fwd + bwd + optimizer, our count)."""
    means = _mean_by(rows, cost_field(rows, "flops_total"))
    if not means:
        return None
    div, unit = _flops_scale(list(means.values()))
    fig, ax = _rank_figure(rows, means, lambda v: v / div, ref_suffix=" (no rank)")
    ax.set_ylabel(f"FLOPs per update [{unit}]\n(analytic, {_size(rows)})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.set_title(f"FLOPs per training update\n{_title(model, dataset, task)}", fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax)
    return fig


def _ours_fwd_bwd(r: dict) -> float | None:
    """Our forward + backward FLOPs (what torch's counter also covers: no optimizer math)."""
    f, b = num(r.get("flops_forward")), num(r.get("flops_backward"))
    if f is None or b is None:
        return None
    return f + b


def plot_flop_counters(rows) -> plt.Figure | None:
    """Per model: ratio torch FlopCounterMode / our count for the same update, per method and
    rank, so the over-count of depthwise weight gradients is visible next to a standard net."""
    # GaLore is left out: its optimizer matmuls (and amortised SVD) are outside our forward +
    # backward figure but partly inside torch's, so the two would not cover the same work.
    data = [(r, _ours_fwd_bwd(r), num(r.get("flops_torch"))) for r in rows
            if r.get("method") != "galore"]
    data = [(r, o, t) for r, o, t in data if o and t]
    if not data:
        return None
    models = list(dict.fromkeys(str(r["model"]) for r, _, _ in data))
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    # left: absolute per-update FLOPs of full FT vs LoRA (smallest rank), ours vs torch's
    ax = axes[0]
    bars: list[tuple[str, float, float]] = []
    for model in models:
        mr = [(r, o, t) for r, o, t in data if r["model"] == model]
        for m in ("full", "lora"):
            cand = [(r, o, t) for r, o, t in mr if r["method"] == m]
            if not cand:
                continue
            cand.sort(key=lambda x: (x[0].get("rank") or 0))
            r, o, t = cand[0]
            rank = r.get("rank")
            lab = f"{model}\n{method_label(m)}" + ("" if rank in (None, "") else f" r{int(rank)}")
            bars.append((lab, o, t))
    div, unit = _flops_scale([max(o, t) for _, o, t in bars] or [1.0])
    x = list(range(len(bars)))
    ax.bar([i - 0.2 for i in x], [o / div for _, o, _ in bars], width=0.4,
           label="convpeft (correct grouped/depthwise)", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], [t / div for _, _, t in bars], width=0.4,
           label="torch FlopCounterMode", color="#c44e52")
    ax.set_xticks(x)
    ax.set_xticklabels([b[0] for b in bars], fontsize=7)
    ax.set_ylabel(f"forward + backward FLOPs per update [{unit}]")
    ax.set_title("FLOPs of one update, two counters", fontsize=10)
    ax.set_ylim(0, 1.35 * max(max(o, t) for _, o, t in bars) / div)
    ax.legend(fontsize=8, loc="upper left")  # in the room above the bars
    ax.grid(axis="y", alpha=0.3)
    # right: torch / ours per model and method (mean over ranks and tasks), one bar each
    ax = axes[1]
    methods = [m for m in METHOD_STYLE if any(r["method"] == m for r, _, _ in data)]
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs, ys = [], []
        for mi, model in enumerate(models):
            ratios = [t / o for r, o, t in data if r["model"] == model and r["method"] == m]
            if ratios:
                xs.append(mi - 0.4 + width * (j + 0.5))
                ys.append(sum(ratios) / len(ratios))
        ax.bar(xs, ys, width=width * 0.95, color=_style(m).get("color"), label=method_label(m))
        for x_, y_ in zip(xs, ys, strict=True):
            ax.annotate(f"{y_:.2g}x", (x_, y_), ha="center", va="bottom", fontsize=6,
                        textcoords="offset points", xytext=(0, 1))
    ax.axhline(1.0, color="black", lw=1, ls="--", label="counters agree")
    ax.set_xticks(list(range(len(models))))
    ax.set_xticklabels(models, fontsize=8)
    ax.set_ylabel("torch count / our count (mean over ranks)")
    ax.set_title("How much torch's counter over-counts, per method\n(GaLore left out: its "
                 "optimizer matmuls are outside forward + backward)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 1.35 * max(ax.get_ylim()[1], 1.0))
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    return fig
