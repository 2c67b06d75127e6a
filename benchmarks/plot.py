"""Plots of a rank sweep, from its results file alone.

    python -m benchmarks.plot results/rank_sweep/results.jsonl [--plots plots/] [--formats png,svg]

Per (model, dataset, task):
  ``flops_<model>_<task>``     rank vs FLOPs per update (one line per ranked method; full FT,
                               head and BitFit as horizontal reference lines)
  ``memory_<model>_<task>``    rank vs peak memory, stacked by what is live at the peak (of the
                               plain updates); where the rows also hold lean / checkpointed
                               updates (``lean``/``checkpoint`` columns) their peaks are marked
                               on the same bars
  ``accuracy_<model>_<task>``  rank vs target accuracy, mean over seeds with 95% t-interval
                               error bars (no-rank methods and zero-shot: line + shaded band)
  ``pareto_<model>_<task>``    mean accuracy (95% interval bars) vs peak memory per
                               configuration, Pareto front of the means
Across models:
  ``flop_counters``            our FLOP count vs torch's FlopCounterMode for the same updates,
                               per model (depthwise vs standard nets)

Only rows with ``status == "ok"`` are drawn; accuracy plots are skipped for profile-only runs.
Intervals are :func:`benchmarks.stats.interval` (Student t over seeds); one seed draws none.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (CI, headless servers)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from benchmarks.common import (  # noqa: E402
    MIB,
    VARIANTS,
    method_label,
    num,
    rank_of,
    read_results,
    results_parser,
    variant_of,
)
from benchmarks.stats import Interval, interval  # noqa: E402
from convpeft.methods import list_methods  # noqa: E402

MEMORY_CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations", "temporaries")
CATEGORY_COLORS = {
    "params": "#4c72b0",
    "buffers": "#8c8c8c",
    "grads": "#dd8452",
    "optimizer": "#c44e52",
    "activations": "#55a868",
    "temporaries": "#b3de69",
}
METHOD_STYLE = {
    "full": dict(color="black", ls="--"),
    "head": dict(color="#8172b3", ls=":"),
    "bitfit": dict(color="#937860", ls="-."),
    "lora": dict(color="#4c72b0", marker="o"),
    "lora-fa": dict(color="#64b5cd", marker="v"),
    "dora": dict(color="#dd8452", marker="s"),
    "galore": dict(color="#55a868", marker="^"),
}


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)).strip("-")


def _style(method: str) -> dict:
    return dict(METHOD_STYLE.get(method, dict(marker="x")))


def _flops_scale(values: Sequence[float]) -> tuple[float, str]:
    """Divisor and unit so the largest value reads as a small number."""
    top = max((v for v in values if v), default=1.0)
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if top >= div:
            return div, unit
    return 1.0, "FLOP"


def _group(rows: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("model")), str(r.get("dataset")), str(r.get("task")))].append(r)
    return dict(groups)


def _values_by(rows: Sequence[dict], field: str) -> dict[tuple[str, int | None], list[float]]:
    """The values of ``field`` per (method, rank) over seeds (missing values skipped)."""
    acc: dict[tuple[str, int | None], list[float]] = defaultdict(list)
    for r in rows:
        v = num(r.get(field))
        if v is not None:
            acc[(str(r["method"]), rank_of(r))].append(v)
    return acc


def _mean_by(rows: Sequence[dict], field: str) -> dict[tuple[str, int | None], float]:
    """Mean of ``field`` per (method, rank) over seeds."""
    return {k: sum(v) / len(v) for k, v in _values_by(rows, field).items()}


def _interval_by(rows: Sequence[dict], field: str) -> dict[tuple[str, int | None], Interval]:
    """Mean and 95% t-interval of ``field`` per (method, rank) over seeds."""
    return {k: interval(v) for k, v in _values_by(rows, field).items()}


def _ranks(rows: Sequence[dict]) -> list[int]:
    return sorted({int(r["rank"]) for r in rows if r.get("rank") not in (None, "")})


def _rank_axis(ax, ranks: Sequence[int]) -> None:
    """log2 rank axis with a tick at every swept rank."""
    if ranks:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(list(ranks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(r) for r in ranks])
        lo, hi = min(ranks), max(ranks)
        ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xlabel("rank")


def _methods_in(means: dict[tuple[str, int | None], float]) -> tuple[list[str], list[str]]:
    """(ranked methods, unranked reference methods) present, in the plots' order (that of
    ``METHOD_STYLE``); methods it does not style come last, ranked if their rows have ranks."""
    order = list(METHOD_STYLE)
    present = {m for m, _ in means}
    ranked_names = set(list_methods(ranked=True))
    ranked = [m for m in order if m in present and m in ranked_names]
    ranked += sorted(m for m in present - set(order) if any(k[1] is not None for k in means
                                                             if k[0] == m))
    refs = [m for m in order if m in present and m not in ranked_names]
    return ranked, refs


def _rank_figure(rows: Sequence[dict], means: dict[tuple[str, int | None], float],
                 y: Callable[[float], float], ref_suffix: str = "",
                 intervals: dict[tuple[str, int | None], Interval] | None = None):
    """A figure with a line over rank per ranked method and a horizontal line per reference
    method, values mapped through ``y`` (unit scaling); returns ``(fig, ax)``. With
    ``intervals``, ranked points get error bars and reference lines a shaded band."""
    ranked, refs = _methods_in(means)
    intervals = intervals or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in ranked:
        pts = sorted((r, v) for (mm, r), v in means.items() if mm == m and r is not None)
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [y(p[1]) for p in pts]
        ivs = [intervals.get((m, r)) for r, _ in pts]
        if any(iv is not None and iv.low is not None for iv in ivs):
            err = [[0.0 if iv is None or iv.low is None else yy - y(iv.low)
                    for iv, yy in zip(ivs, ys, strict=True)],
                   [0.0 if iv is None or iv.high is None else y(iv.high) - yy
                    for iv, yy in zip(ivs, ys, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=method_label(m), **_style(m))
        else:
            ax.plot(xs, ys, label=method_label(m), **_style(m))
    for m in refs:
        v = means.get((m, None))
        if v is not None:
            st = _style(m)
            ax.axhline(y(v), label=method_label(m) + ref_suffix, lw=1.5, **st)
            iv = intervals.get((m, None))
            if iv is not None and iv.low is not None:
                ax.axhspan(y(iv.low), y(iv.high), color=st.get("color"), alpha=0.1, lw=0)
    _rank_axis(ax, _ranks(rows))
    return fig, ax


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        # No creation date and a fixed SVG id salt: the same results give byte-identical files,
        # so committed plots only change in git when the numbers do.
        meta = {"Date": None} if fmt in ("svg", "pdf") else {}
        with plt.rc_context({"svg.hashsalt": "convpeft"}):
            fig.savefig(p, dpi=130, bbox_inches="tight", metadata=meta)
        out.append(p)
    plt.close(fig)
    return out


def _title(model: str, dataset: str, task: str) -> str:
    return f"{model} — {dataset}, task: {task}"


def plot_flops(rows, model, dataset, task) -> plt.Figure | None:
    """Rank vs FLOPs of one update (fwd + bwd + optimizer, our count)."""
    means = _mean_by(rows, "flops_total")
    if not means:
        return None
    div, unit = _flops_scale(list(means.values()))
    fig, ax = _rank_figure(rows, means, lambda v: v / div, ref_suffix=" (no rank)")
    ax.set_ylabel(f"FLOPs per update [{unit}]")
    ax.set_ylim(bottom=0)
    ax.set_title(f"FLOPs per training update\n{_title(model, dataset, task)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


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
    others = {v: _mean_by(by_variant[v], "memory_peak") for v in VARIANTS
              if v != base and v in by_variant}
    rows = by_variant[base]
    cats = [c for c in MEMORY_CATEGORIES if any(f"memory_by_category_{c}" in r for r in rows)]
    means = {c: _mean_by(rows, f"memory_by_category_{c}") for c in cats}
    peak = _mean_by(rows, "memory_peak")
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
    legend: dict[str, object] = {}  # every panel's entries (variant markers may be in any)
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="upper center",
               ncol=min(len(legend), 7), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    what = "" if base == "plain" else f" ({base})"
    fig.suptitle(f"Peak memory of one update{what}, by category\n{_title(model, dataset, task)}",
                 fontsize=10, y=1.1)
    return fig


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
    ax.legend(fontsize=8)
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
    ax.legend(fontsize=7, ncol=2)
    return fig


def make_plots(
    rows: Sequence[dict], plots_dir: str | os.PathLike, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Draw every plot the rows support into ``plots_dir``; returns the files written."""
    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows)
    written: list[Path] = []
    for (model, dataset, task), grp in sorted(_group(ok).items()):
        stem = f"{_slug(model)}_{_slug(dataset)}_{_slug(task)}"
        for kind, fn in (
            ("flops", plot_flops),
            ("memory", plot_memory),
            ("accuracy", plot_accuracy),
            ("pareto", plot_pareto),
        ):
            fig = fn(grp, model, dataset, task)
            if fig is not None:
                written += _save(fig, out_dir, f"{kind}_{stem}", formats)
    fig = plot_flop_counters(ok)
    if fig is not None:
        written += _save(fig, out_dir, "flop_counters", formats)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = results_parser(
        "python -m benchmarks.plot",
        "Regenerate all rank-sweep plots from a results file (.jsonl or .csv) or a results "
        "folder.",
    )
    p.add_argument("--plots", default="plots", help="output folder for the figures "
                   "(default: plots/)")
    p.add_argument("--formats", default="png,svg",
                   help="comma-separated figure formats (default: png,svg)")
    a = p.parse_args(argv)
    rows = read_results(a.results)
    if rows is None:
        return 2
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    files = make_plots(rows, a.plots, formats)
    n_ok = len(_ok(rows))
    print(f"{len(files)} files from {n_ok} ok rows (of {len(rows)}) -> {a.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
