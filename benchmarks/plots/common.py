"""What every rank-sweep plot shares: method styles, per-(method, rank) means over seeds, and
the rank figure.

Most plots are "a value over rank": one line per ranked method (LoRA, DoRA, GaLore, ...) on a
log2 rank axis with a tick at every swept rank, and the methods without a rank (full FT, head,
BitFit) as horizontal reference lines. :func:`_rank_figure` draws that once for all of them,
from means keyed by ``(method, rank)`` over seeds (:func:`_mean_by`, or :func:`_interval_by`
for 95% t-intervals); each plot kind (:mod:`benchmarks.plots.flops`,
:mod:`benchmarks.plots.memory`, :mod:`benchmarks.plots.accuracy`) only maps units and labels.
A method keeps its colour and marker (:data:`METHOD_STYLE`) in every plot. Importing this
module selects matplotlib's file-only Agg backend.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window (CI, headless servers)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from benchmarks.common import cost_field as cost_field  # noqa: E402
from benchmarks.common import cost_where as cost_where  # noqa: E402
from benchmarks.common import method_label, num, rank_of  # noqa: E402
from benchmarks.common import uses_costs as uses_costs  # noqa: E402
from benchmarks.sweep.stats import Interval, metric_interval  # noqa: E402
from convpeft.methods import list_methods  # noqa: E402

METHOD_STYLE = {
    "full": dict(color="black", ls="--"),
    "head": dict(color="#8172b3", ls=":"),
    "bitfit": dict(color="#937860", ls="-."),
    "lora": dict(color="#4c72b0", marker="o"),
    "lora-fa": dict(color="#64b5cd", marker="v"),
    "dora": dict(color="#dd8452", marker="s"),
    "galore": dict(color="#55a868", marker="^"),
}


def _style(method: str) -> dict:
    return dict(METHOD_STYLE.get(method, dict(marker="x")))


def _flops_scale(values: Sequence[float]) -> tuple[float, str]:
    """Divisor and unit so the largest value reads as a small number."""
    top = max((v for v in values if v), default=1.0)
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if top >= div:
            return div, unit
    return 1.0, "FLOP"


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
    """Mean and 95% interval of ``field`` per (method, rank) over seeds (for an accuracy on the
    interval cut to 0..1: :data:`benchmarks.sweep.stats.METRIC_BOUNDS`)."""
    return {k: metric_interval(v, field) for k, v in _values_by(rows, field).items()}


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
    ``intervals``, ranked points get error bars (methods nudged sideways, :data:`DODGE`) and
    reference lines a bar right of the last rank (:func:`reference_interval`)."""
    ranked, refs = _methods_in(means)
    intervals = intervals or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, m in enumerate(ranked):
        pts = sorted((r, v) for (mm, r), v in means.items() if mm == m and r is not None)
        if not pts:
            continue
        # each method nudged sideways on the log2 axis, so methods with equal values at a rank
        # (LoRA and DoRA) and their interval bars stay visible side by side
        shift = 2 ** (DODGE * (i - (len(ranked) - 1) / 2))
        xs, ys = [p[0] * shift for p in pts], [y(p[1]) for p in pts]
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
            label = method_label(m) + ref_suffix
            ax.axhline(y(v), label=label, lw=1.5, **st)
    _rank_axis(ax, _ranks(rows))
    for m in refs:
        iv = intervals.get((m, None))
        if means.get((m, None)) is not None and iv is not None and iv.low is not None:
            reference_interval(ax, y(iv.mean), y(iv.low), y(iv.high), _style(m).get("color"))
    return fig, ax


def reference_interval(ax, mean: float, low: float, high: float, color) -> None:
    """The interval of a horizontal reference line (full FT, zero-shot, ...) as a bar in the
    margin right of the last rank, one slot per line in drawing order, so that wide intervals
    do not cover the ranked methods' bars as shaded bands would. Call after the rank axis is
    set (:func:`_rank_axis`)."""
    lo, hi = ax.get_xlim()
    slot = getattr(ax, "_convpeft_ref_slots", 0)
    base = getattr(ax, "_convpeft_ref_base", hi)
    ax._convpeft_ref_slots, ax._convpeft_ref_base = slot + 1, base
    x = base * 2 ** (REF_STEP * (slot + 0.5))
    ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="_", color=color,
                capsize=3, lw=1.2, ms=8)
    ax.set_xlim(lo, base * 2 ** (REF_STEP * (slot + 1)))


DODGE = 0.06
"""Sideways offset between the ranked methods of a rank figure, in log2 units of rank."""
REF_STEP = 0.3
"""Width of one reference-interval slot right of the last rank, in log2 units of rank."""
BAND = "_band:"
"""Label prefix of an interval band (``fill_between``/``axhspan``) that :func:`legend` draws
under the line labelled with the rest of it, as one entry."""


def legend(ax, title: str | None = None, **kw) -> None:
    """The axes' legend beside the plot (never over the data), each line drawn over its
    interval band where it has one (an artist labelled :data:`BAND` + the line's label)."""
    from matplotlib.legend_handler import HandlerTuple

    bands = {c.get_label()[len(BAND):]: c for c in ax.get_children()
             if str(c.get_label()).startswith(BAND)}
    handles, labels = ax.get_legend_handles_labels()
    handles = [(bands[lab], h) if lab in bands else h
               for h, lab in zip(handles, labels, strict=True)]
    ax.legend(handles, labels, handler_map={tuple: HandlerTuple(ndivide=1)}, fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title=title,
              title_fontsize=8, **kw)


def _title(model: str, dataset: str, task: str) -> str:
    return f"{model} — {dataset}, task: {task}"


# ------------------------------------------------------------------ configurations and costs
KEY_COLUMNS: tuple[str, ...] = (
    "update_blocks", "target", "batch_size", "resolution", "lean", "checkpoint", "amp", "bn",
    "small_input", "prefix_chunks", "prefix_stats", "settings_signature", "cost_batch",
    "cost_resolution", "cost_device", "cost_source",
)
"""What tells two configurations of one (model, dataset, task) apart besides method, rank and
seed: rows that differ in one of these are never averaged into one point. A figure splits its
rows by them (:func:`split_configurations`) except the ones it draws apart itself (the memory
figure: lean/checkpointed variants as markers; the Pareto figure: each ``update_blocks`` a
point)."""


def _cell(row: dict, column: str):
    """A key column's value, the same whether the row came from JSONL or CSV (``None``, empty
    cells and ``"all"`` blocks alike; numbers as numbers; booleans as bools)."""
    v = row.get(column)
    if v in (None, "", "all"):
        return None
    if column in ("lean", "checkpoint", "small_input"):
        return v if isinstance(v, bool) else str(v).lower() in ("true", "1")
    n = num(v)
    return int(n) if n is not None and float(n).is_integer() else (n if n is not None else v)


SPARSE_ONLY = ("prefix_chunks", "prefix_stats")
"""Key columns that only sparse rows (``update_blocks`` set) have: an every-layer row has none."""


def split_configurations(rows: Sequence[dict], drawn_apart: Sequence[str] = ()
                         ) -> list[tuple[dict, list[dict]]]:
    """The rows split by every :data:`KEY_COLUMNS` value except ``drawn_apart``: a list of
    ``(what differs, rows)`` in first-seen order, ``what differs`` mapping each key column
    whose value varies between the parts to this part's value (empty for a single part).

    Where ``update_blocks`` is drawn apart (sparse rows beside every-layer ones in one
    figure), the every-layer rows, which have no prefix settings (:data:`SPARSE_ONLY`), join
    each part of sparse rows that agrees with them on every other column."""
    cols = [c for c in KEY_COLUMNS if c not in drawn_apart]
    sparse_apart = "update_blocks" in drawn_apart
    parts: dict[tuple, list[dict]] = {}
    every: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(_cell(r, c) for c in cols)
        if sparse_apart and _cell(r, "update_blocks") is None:
            every.setdefault(key, []).append(r)
        else:
            parts.setdefault(key, []).append(r)
    shared = [i for i, c in enumerate(cols) if c not in SPARSE_ONLY]
    for key, grp in every.items():
        homes = [k for k in parts if all(k[i] == key[i] for i in shared)]
        for k in homes:
            parts[k] = grp + parts[k]
        if not homes:
            parts[key] = grp
    varying = [i for i, c in enumerate(cols) if len({k[i] for k in parts}) > 1]
    return [({cols[i]: k[i] for i in varying}, grp) for k, grp in parts.items()]


def part_suffix(differs: dict) -> str:
    """A file-name suffix naming what sets a part apart, e.g. ``__batch_size-16`` (empty for
    the only part)."""
    return "".join(f"__{c}-{'all' if v is None else v}" for c, v in differs.items()
                   if c != "settings_signature" and not (c in SPARSE_ONLY and v is None)) + (
        f"__settings-{differs['settings_signature']}" if "settings_signature" in differs else "")
