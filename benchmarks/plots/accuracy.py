"""Accuracy plots: what adaptation achieves over rank, and what it costs in memory.

``accuracy_<model>_<task>`` (:func:`plot_accuracy`) is the rank figure of target accuracy, with
zero-shot (no update) as the floor; ``pareto_<model>_<task>`` (:func:`plot_pareto`) puts each
configuration's accuracy against its peak memory, the Pareto front of the means
(:func:`pareto_front`) with the band its members' intervals span, and rings round every
configuration the seeds cannot separate from the most accurate one (paired, as findings.md
compares): with a few seeds the front is not a ranking. Both show means over seeds with 95%
t-intervals cut to 0..100% (:func:`benchmarks.sweep.stats.interval`); one seed draws none. Legends
sit beside the axes, never over the data. Profile-only rows have no
accuracy, so both return None for them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import matplotlib.pyplot as plt

from benchmarks.common import MIB, blocks_of, flag_of, method_label, num, rank_of
from benchmarks.plots.common import (
    BAND,
    _interval_by,
    _mean_by,
    _rank_figure,
    _style,
    _title,
    cost_field,
    cost_where,
    legend,
    reference_interval,
    uses_costs,
)
from benchmarks.sweep.stats import metric_interval


def _seed_counts(ivs: dict) -> str:
    ns = sorted({iv.n for iv in ivs.values()})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"mean over {n} seed(s)" + (", 95% t-interval in 0-100%" if ns[-1] > 1 else "")


def _clamp_percent(ax) -> None:
    """Keep an accuracy axis within 0..100% (a wide interval over few seeds may reach past
    them; its bar is then cut at the frame, the interval itself is unchanged)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -2.0), min(hi, 102.0))


def plot_accuracy(rows, model, dataset, task) -> plt.Figure | None:
    """Rank vs target accuracy (mean over seeds, 95% interval bars); zero-shot (no update) and
    the no-rank methods (full FT, ...) as reference lines, their intervals as bars right of
    the last rank."""
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
        zs = metric_interval([sum(v) / len(v) for v in zs_by_seed.values()], "zero_shot_acc")
        ax.axhline(100 * zs.mean, color="gray", ls=(0, (1, 3)), lw=2,
                   label="zero-shot (no update)")
        if zs.low is not None:
            reference_interval(ax, 100 * zs.mean, 100 * zs.low, 100 * zs.high, "gray")
    ax.set_ylabel(f"target test accuracy [%]\n({_seed_counts(ivs)})")
    _clamp_percent(ax)
    ax.set_title(f"Accuracy after adaptation\n{_title(model, dataset, task)}", fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax, title="bars: 95% interval (right of the\nlast rank: the horizontal lines')")
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


Key = tuple[str, "int | None", "int | None"]  # (method, rank, update_blocks)


def _split_by_blocks(rows: Sequence[dict]) -> dict[int | None, list[dict]]:
    out: dict[int | None, list[dict]] = defaultdict(list)
    for r in rows:
        out[blocks_of(r)].append(r)
    return out


def _by_seed(rows: Sequence[dict]) -> dict[Key, dict[int, float]]:
    """Target accuracy per (method, rank, update_blocks) and seed, for paired comparisons."""
    out: dict[Key, dict[int, float]] = defaultdict(dict)
    for r in rows:
        v = num(r.get("target_acc"))
        if v is not None and r.get("seed") not in (None, ""):
            out[(str(r["method"]), rank_of(r), blocks_of(r))][int(r["seed"])] = v
    return out


REFERENCE_RATIOS: dict[str, float] = {
    "TinyTL (bias + lite residual)": 1 / 6.5,
    "Back Razor": 1 / 9.2,
}
"""Published training-memory ratios to full fine-tuning (TinyTL: 6.5x less, Cai et al. 2020;
Back Razor: 9.2x less, Jiang et al. 2022), drawn as reference lines at that fraction of the
plotted full fine-tuning's peak (from their papers, not measured here)."""


def exact_floor(rows: Sequence[dict], model: str) -> float | None:
    """Bytes below which no exact update of LoRA on every layer can go, at the size the rows'
    costs are drawn at (the deployment size with the ImageNet stem where they carry
    ``cost_*`` columns, else the training batch and resolution), rank and BN policy
    (:func:`benchmarks.lean_memory.update_floor`: resident state plus the worst layer's input
    and output gradients; a tensor-level lower bound). None without an every-layer LoRA
    row."""
    from benchmarks.lean_memory import update_floor
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model

    lora = [r for r in rows if r.get("method") == "lora" and blocks_of(r) is None
            and rank_of(r) is not None and num(r.get("batch_size")) and num(r.get("resolution"))]
    if not lora:
        return None
    r0 = lora[0]
    deploy = uses_costs(rows) and num(r0.get("cost_batch")) is not None
    small = False if deploy else flag_of(r0, "small_input", default=True)
    net = build_model(model, 10, small_input=small)
    prepared = prepare(net, MethodConfig("lora", rank=rank_of(r0), bn=r0.get("bn") or "train"))
    batch = int(num(r0["cost_batch" if deploy else "batch_size"]))
    res = int(num(r0["cost_resolution" if deploy else "resolution"]))
    return float(update_floor(net, prepared.optimizer, (batch, 3, res, res))["floor"])


def plot_pareto(rows, model, dataset, task) -> plt.Figure | None:
    """Mean target accuracy (95% interval bars) vs peak memory per configuration: the Pareto
    front of the means with the band of its members' intervals, and a ring round each
    configuration the seeds do not separate from the most accurate one. A configuration is
    (method, rank, ``update_blocks``): sparse updates are points of their own, and where there
    are any and full fine-tuning is plotted, :data:`REFERENCE_RATIOS` are drawn as vertical
    lines at those fractions of full fine-tuning's peak, and the exact floor of LoRA on every
    layer (:func:`exact_floor`) as a dashed one."""
    from benchmarks.sweep.accuracy_findings import separation

    acc: dict[Key, object] = {}
    mem: dict[Key, float] = {}
    peak_f = cost_field(rows, "memory_peak")  # the deployment size's device peak where present
    for k, sub in _split_by_blocks(rows).items():  # sparse updates are configurations too
        acc.update({(m, r, k): iv for (m, r), iv in _interval_by(sub, "target_acc").items()})
        mem.update({(m, r, k): v for (m, r), v in _mean_by(sub, peak_f).items()})
    keys = [k for k in acc if k in mem]
    if not keys:
        return None
    pts = [(mem[k] / MIB, 100 * acc[k].mean) for k in keys]
    labels = [method_label(m) + ("" if r is None else f" r{r}")
              + ("" if b is None else f" last {b}") for m, r, b in keys]
    methods = [m for m, _, _ in keys]
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
                        fmt="none", ecolor=st.get("color"), capsize=2, lw=1, zorder=2,
                        alpha=0.8)
    front = pareto_front(pts)
    fx = [pts[i][0] for i in front]
    ax.step(fx, [pts[i][1] for i in front], where="post", color="red", lw=1.2, zorder=2,
            label="Pareto front of the means")
    ivs = [acc[keys[i]] for i in front]
    if all(iv.low is not None for iv in ivs):
        ax.fill_between(fx, [100 * iv.low for iv in ivs], [100 * iv.high for iv in ivs],
                        step="post", color="red", alpha=0.08, lw=0,
                        label=BAND + "Pareto front of the means")
    # which configurations the seeds cannot tell from the most accurate one
    best = max(range(len(keys)), key=lambda i: pts[i][1])
    seeds = _by_seed(rows)
    recs = [{"target": acc[k], "by_seed": seeds.get(k, {})} for k in keys]
    same = [i for i in range(len(keys))
            if i == best or separation(recs[i], recs[best]) in (0, None)]
    if len(same) > 1:
        ax.scatter([pts[i][0] for i in same], [pts[i][1] for i in same], s=150,
                   facecolors="none", edgecolors="black", lw=0.8, zorder=4,
                   label=f"not separable from {labels[best]} (paired, 95%)")
    full = mem.get(("full", None, None))
    if full is not None and any(b is not None for _, _, b in keys):
        # sparse rows: the published ratios of the systems edge users compare against
        for (name, ratio), ls in zip(REFERENCE_RATIOS.items(), (":", "-."), strict=True):
            ax.axvline(full * ratio / MIB, color="gray", ls=ls, lw=1, zorder=1,
                       label=f"{name}: {ratio:.3f}x full FT (published)")
        floor = exact_floor(rows, model)
        if floor is not None:  # what sparse updates go below: no exact every-layer update can
            ax.axvline(floor / MIB, color="black", ls="--", lw=1, zorder=1,
                       label=f"exact floor, LoRA every layer (tensor-level): {floor / full:.3f}x "
                       "full FT")
    for i in front:
        ax.annotate(labels[i], pts[i], textcoords="offset points", xytext=(7, 0),
                    va="center", fontsize=7, color="red", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.set_xlabel(f"peak memory of one update [MiB]\n({cost_where(rows)})", fontsize=9)
    ax.set_ylabel(f"target test accuracy [%]\n({_seed_counts(acc)})")
    _clamp_percent(ax)
    ax.set_title(f"Accuracy vs memory (up-left is better)\n{_title(model, dataset, task)}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax, title="bars, band: 95% interval")
    return fig
