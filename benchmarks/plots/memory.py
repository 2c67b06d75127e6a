"""Memory plot: what is live at the peak of one update, over rank, per method.

``memory_<model>_<task>`` (:func:`plot_memory`) stacks the peak by category (params, buffers,
grads, optimizer state, activations, temporaries), one panel per ranked method and one for the
methods without a rank, so it shows *what* a method saves, not only how much. Bars are the
plain updates (or the one variant present); the peaks of the lean / checkpointed variants of the
same configurations are markers on those bars, and full fine-tuning's peak a dashed line.
"""

from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt

from benchmarks.common import MIB, VARIANTS, method_label, num, variant_of
from benchmarks.plots.common import _mean_by, _methods_in, _ranks, _title, cost_field, cost_where

MEMORY_CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations", "temporaries",
                     "scratch")
CATEGORY_COLORS = {
    "params": "#4c72b0",
    "buffers": "#8c8c8c",
    "grads": "#dd8452",
    "optimizer": "#c44e52",
    "activations": "#55a868",
    "temporaries": "#b3de69",
    "scratch": "#e5ae38",  # kernel scratch beyond the live tensors (the device's, not a tensor)
}
VARIANT_MARKERS = {"lean": dict(marker="D", color="#c44e52"),
                   "ckpt": dict(marker="^", color="#8172b2"),
                   "lean + ckpt": dict(marker="v", color="#dd8452")}


def plot_memory(rows, model, dataset, task) -> plt.Figure | None:
    """Stacked bars of what is live at the peak, one panel per method (ranked ones over rank),
    for the plain updates (or the one variant present); the peaks of the other variants
    (lean, checkpointed) as markers on the same bars."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_variant[variant_of(r)].append(r)
    base = "plain" if "plain" in by_variant else next(v for v in VARIANTS if v in by_variant)
    # the deployment-size device peak where the rows carry it (else older rows' training-size
    # tensor-level peak); where, how and on what: in the axis label
    where = cost_where(rows)
    peak_f, cat_f = cost_field(rows, "memory_peak"), cost_field(rows, "memory_by_category")
    others = {v: _mean_by(by_variant[v], peak_f) for v in VARIANTS
              if v != base and v in by_variant}
    rows = by_variant[base]
    cats = [c for c in MEMORY_CATEGORIES
            if any(num(r.get(f"{cat_f}_{c}")) is not None for r in rows)]
    means = {c: _mean_by(rows, f"{cat_f}_{c}") for c in cats}
    peak = _mean_by(rows, peak_f)
    for v in others.values():  # a (method, rank) only a variant has gets an empty bar
        for k in v:
            peak.setdefault(k, 0.0)
    if not peak:
        return None
    ranked, refs = _methods_in(peak)
    ranks = _ranks(rows)
    panels = ([("baselines", refs)] if refs else []) + [(m, [m]) for m in ranked]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.2 + 2.3 * len(panels), 4.2), sharey=True, squeeze=False
    )
    full_peak = peak.get(("full", None))
    for ax, (title, methods) in zip(axes[0], panels, strict=True):
        if title == "baselines":
            keys = [(m, None) for m in methods if (m, None) in peak]
            labels = [method_label(m) for m, _ in keys]
        else:
            keys = [(title, r) for r in ranks if (title, r) in peak]
            labels = [f"r={r}" for _, r in keys]
        x = list(range(len(keys)))
        bottom = [0.0] * len(keys)
        for c in cats:
            h = [means[c].get(k, 0.0) / MIB for k in keys]
            ax.bar(x, h, bottom=bottom, color=CATEGORY_COLORS.get(c), label=c, width=0.7)
            bottom = [b + hh for b, hh in zip(bottom, h, strict=True)]
        if not cats:  # profile without a breakdown: the peak alone
            ax.bar(x, [peak[k] / MIB for k in keys], color="#999999", label="peak")
        for v, vpeak in others.items():
            pts = [(i, vpeak[k] / MIB) for i, k in enumerate(keys) if k in vpeak]
            if pts:
                ax.scatter([i for i, _ in pts], [h for _, h in pts], s=28, zorder=3,
                           edgecolors="black", linewidths=0.5, label=f"{v} peak",
                           **VARIANT_MARKERS[v])
        if full_peak is not None:
            ax.axhline(full_peak / MIB, color="black", ls="--", lw=1, label="full FT peak")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=0 if title != "baselines" else 20, fontsize=8)
        ax.set_title(method_label(title) if title != "baselines" else "no-rank methods", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("memory live at the peak [MiB]")
    fig.supxlabel(f"peak of one update: {where}", fontsize=8)
    legend: dict[str, object] = {}  # every panel's entries (variant markers may be in any)
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="upper center",
               ncol=min(len(legend), 8), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    what = "" if base == "plain" else f" ({base})"
    fig.suptitle(f"Peak memory of one update{what}, by category\n{_title(model, dataset, task)}",
                 fontsize=10, y=1.1)
    return fig
