"""Accuracy with uncertainty: 95% intervals over seeds and the per-configuration summary table.

A sweep runs every configuration at several seeds. On the offline default a seed draws the
digits train/test split, the source model's pretraining, the few-shot sample, the new head rows
and adapter init, and the batch order, so the spread over seeds covers everything that differs
between two runs, two machines included (see docs/reproducibility.md). An accuracy is
reported as the mean over seeds with a two-sided 95% **Student-t interval cut to the
metric's range**::

    [max(0, mean - h), min(1, mean + h)],   h = t(0.975, n - 1) * s / sqrt(n)

with ``s`` the sample standard deviation (``n - 1`` in the divisor). Over three widely spread
seeds the plain ``mean +- h`` reaches past 0 or 1 (101.4%, -7.6% in an earlier run), values no
accuracy can take. An accuracy's true mean lies in [0, 1], so cutting the interval there drops
only values that could never be covered: the coverage stays the t-interval's, the mean stays
inside (a logit-scale interval would stay inside [0, 1] too, but centres on another mean than
the one reported). ``forgetting`` (a difference of two accuracies) is cut to [-1, 1]; see
:data:`METRIC_BOUNDS`. A paired comparison's per-seed differences keep the plain interval
(its sign is what is tested).

A t-interval, not a bootstrap: with the 3 to 10 seeds a sweep affords, a percentile bootstrap
never reaches beyond the smallest and largest observed value and covers far less than 95%.
One seed gives no interval (``None``). The t quantile is computed here in closed form for
integer degrees of freedom (no SciPy needed; :func:`t_quantile`).

Two configurations are *ranked* only when the seeds separate them; otherwise they are
*indistinguishable* at this number of seeds. Configurations of one sweep that ran on the same
seeds share, seed by seed, the data split, the source model and the few-shot sample, and most
of the spread over seeds is that shared part (a weak source model lowers every method alike).
So the test is **paired** where it can be (:func:`paired_interval`, :func:`compare_paired`):
the 95% t-interval of the per-seed differences ``a_s - b_s`` must exclude zero. Where fewer than
two seeds are shared, the marginal intervals must not overlap (:func:`compare`), a stricter
test. Both are 5%-level tests of "no difference"; neither corrects for the many pairs a
findings page compares, so a ranking is a statement about this grid, not a p-value.

:func:`summarize` folds the rows (one per configuration and seed) into one record per
configuration group: ``(model, dataset, task, method, rank, settings_signature)``, every field
of :data:`INTERVAL_METRICS` as ``_mean``, ``_sd``, ``_ci_low``, ``_ci_high`` and the cost
columns of :data:`COST_COLUMNS` (seed-independent: a sweep profiles once per configuration;
their value, or the mean where rows of several runs differ).
``results_summary.csv`` beside ``results.csv`` holds that table (:func:`write_summary_csv`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ACCURACY",
    "CONFIDENCE",
    "COST_COLUMNS",
    "GROUP_COLUMNS",
    "INTERVAL_METRICS",
    "METRIC_BOUNDS",
    "SUMMARY_NAME",
    "Interval",
    "compare",
    "compare_paired",
    "interval",
    "metric_interval",
    "paired_interval",
    "summarize",
    "summary_columns",
    "t_cdf_two_sided",
    "t_quantile",
    "write_summary_csv",
]

CONFIDENCE = 0.95
"""Coverage of every interval the benchmarks report."""
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "target_acc": (0.0, 1.0), "source_acc": (0.0, 1.0), "zero_shot_acc": (0.0, 1.0),
    "forgetting": (-1.0, 1.0),
}
"""The range of each seed-dependent metric (accuracies are proportions; forgetting a difference
of two): their intervals are cut to it (:func:`interval`'s ``bounds``)."""
ACCURACY = METRIC_BOUNDS["target_acc"]
"""An accuracy's range, for :func:`interval`'s ``bounds``."""
SUMMARY_NAME = "results_summary.csv"
GROUP_COLUMNS: tuple[str, ...] = ("model", "dataset", "task", "method", "rank",
                                  "update_blocks", "settings_signature")
"""What identifies a configuration group: the resume key without the seed."""
INTERVAL_METRICS: tuple[str, ...] = ("target_acc", "source_acc", "zero_shot_acc", "forgetting")
"""Row fields that vary with the seed and get a mean and an interval in the summary."""
COST_COLUMNS: tuple[str, ...] = (
    "trainable_params", "adapter_bytes", "flops_forward", "flops_backward", "flops_optimizer",
    "flops_total", "flops_torch", "memory_peak", "memory_by_category_activations",
    "step_time_s",
)
"""Seed-independent cost columns copied into the summary (mean over the group's rows)."""
DEPLOYMENT_COST_COLUMNS: tuple[str, ...] = (
    "cost_batch", "cost_resolution", "cost_device", "cost_source", "cost_memory_peak",
    "cost_memory_vs_full", "cost_flops_total", "cost_trainable_params", "cost_max_batch",
    "cost_step_time_s", "cost_step_time_vs_full",
)
"""The costs at the deployment size (:mod:`benchmarks.sweep.cost`), copied into the summary
like :data:`COST_COLUMNS` (a run's rows share one size; compare_runs leaves them out, so runs
from before they existed still compare)."""


def num(v: object) -> float | None:
    """A finite float, or None (missing, empty CSV cell, NaN)."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def t_cdf_two_sided(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (integer >= 1) degrees of freedom.

    Closed form (Abramowitz & Stegun 26.7.3-4) with ``theta = atan(t / sqrt(df))``: for odd
    ``df`` ``(2/pi) (theta + sin cos (1 + 2/3 cos^2 + ...))``, for even ``df``
    ``sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)``.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = term
            for k in range(1, (df - 3) // 2 + 1):  # 2*4*...*(2k) / (3*5*...*(2k+1)) cos^2k
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
        return (2 / math.pi) * (theta + s * math.cos(theta) * total)
    total, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):  # 1*3*...*(2k-1) / (2*4*...*(2k)) cos^2k
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence`` (e.g. 4.303 for df=2 at 95%), by bisection
    on :func:`t_cdf_two_sided` to 1e-10."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < confidence:
        hi *= 2
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = (lo + hi) / 2
        if t_cdf_two_sided(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its ``confidence`` t-interval; ``sd``/``low``/``high`` are
    None for a single value (no interval from one seed)."""

    mean: float
    n: int
    sd: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2

    def format(self, scale: float = 100.0, digits: int = 1, unit: str = "%") -> str:
        """``"84.5% [80.1, 88.9]"`` (``scale`` 100: fractions as percent), or
        ``"84.5% (1 seed)"`` without an interval."""
        m = f"{scale * self.mean:.{digits}f}{unit}"
        if self.low is None:
            return f"{m} (1 seed)"
        return f"{m} [{scale * self.low:.{digits}f}, {scale * self.high:.{digits}f}]"


def interval(values: Sequence[float], confidence: float = CONFIDENCE,
             bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and two-sided Student-t interval of ``values`` (see the module docstring).

    ``bounds=(lo, hi)``: the metric's range (an accuracy's is (0, 1)); the interval is cut to
    it. The true mean lies in that range, so the cut part never held it and the coverage stays
    what the t-interval's is; ``mean`` always lies inside the result."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("interval of no values: pass at least one")
    if bounds is not None and (not bounds[0] < bounds[1]
                               or any(not bounds[0] <= x <= bounds[1] for x in xs)):
        raise ValueError(f"values {xs} outside bounds {bounds}: pass the metric's range")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, 1, None, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, n, sd, low, high)


def metric_interval(values: Sequence[float], metric: str,
                    confidence: float = CONFIDENCE) -> Interval:
    """:func:`interval` of a row metric's values, cut to its range (:data:`METRIC_BOUNDS`) when
    every value lies in it; values no sweep writes (an accuracy above 1 in a hand-made row)
    get the plain interval rather than an error, so a summary of odd rows still builds."""
    b = METRIC_BOUNDS.get(metric)
    if b is not None and any(not b[0] <= float(v) <= b[1] for v in values):
        b = None
    return interval(values, confidence, b)


def compare(a: Interval, b: Interval) -> int | None:
    """``1`` if ``a``'s interval lies wholly above ``b``'s, ``-1`` if wholly below, ``0`` if
    they overlap (indistinguishable); ``None`` if either has no interval (one seed)."""
    if a.low is None or b.low is None:
        return None
    if a.low > b.high:
        return 1
    if a.high < b.low:
        return -1
    return 0


def paired_interval(a: Mapping[object, float], b: Mapping[object, float],
                    confidence: float = CONFIDENCE) -> Interval | None:
    """Interval of the per-seed difference ``a[s] - b[s]`` over the seeds both have (mappings
    seed -> value); None when they share fewer than two seeds (no interval to test with)."""
    common = [s for s in a if s in b]
    if len(common) < 2:
        return None
    return interval([a[s] - b[s] for s in common], confidence)


def compare_paired(diff: Interval | None) -> int | None:
    """``1`` if the interval of ``a - b`` lies wholly above zero, ``-1`` wholly below, ``0``
    if it contains zero (indistinguishable); ``None`` without an interval."""
    if diff is None or diff.low is None:
        return None
    if diff.low > 0:
        return 1
    if diff.high < 0:
        return -1
    return 0


def _rank(v) -> int | None:
    return None if v in (None, "") else int(v)


def group_key(row: dict) -> tuple:
    """The row's configuration group (:data:`GROUP_COLUMNS`; rank as an int or None)."""
    return tuple(_rank(row.get(c)) if c in ("rank", "update_blocks") else row.get(c)
                 for c in GROUP_COLUMNS)


def summarize(rows: Iterable[dict], confidence: float = CONFIDENCE) -> list[dict]:
    """One record per configuration group, in first-seen order (see the module docstring).

    Every group with at least one row gets ``n_seeds`` (ok rows), ``seeds`` (space-separated,
    ascending) and ``n_failed``; metrics without any value are None. Rows lacking a model,
    task or method (not sweep rows) are left out.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not all(r.get(c) not in (None, "") for c in ("model", "task", "method")):
            continue
        groups.setdefault(group_key(r), []).append(r)
    out: list[dict] = []
    for key, grp in groups.items():
        ok = [r for r in grp if r.get("status") == "ok"]
        rec: dict = dict(zip(GROUP_COLUMNS, key, strict=True))
        seeds = sorted({int(r["seed"]) for r in ok if r.get("seed") not in (None, "")})
        rec.update(n_seeds=len(ok), seeds=" ".join(map(str, seeds)),
                   n_failed=len(grp) - len(ok))
        for m in INTERVAL_METRICS:
            vals = [v for v in (num(r.get(m)) for r in ok) if v is not None]
            iv = metric_interval(vals, m, confidence) if vals else None
            rec[f"{m}_mean"] = iv.mean if iv else None
            rec[f"{m}_sd"] = iv.sd if iv else None
            rec[f"{m}_ci_low"] = iv.low if iv else None
            rec[f"{m}_ci_high"] = iv.high if iv else None
        for c in COST_COLUMNS:  # equal over seeds (one profile per configuration): kept as is
            vals = [r.get(c) for r in ok if num(r.get(c)) is not None]
            rec[c] = (None if not vals else vals[0] if len(set(vals)) == 1
                      else sum(map(float, vals)) / len(vals))
        for c in DEPLOYMENT_COST_COLUMNS:  # one value per group (costed once); text kept as is
            vals = [r.get(c) for r in ok if r.get(c) not in (None, "")]
            rec[c] = (None if not vals else vals[0] if len(set(vals)) == 1
                      else sum(map(float, vals)) / len(vals) if all(num(v) is not None
                                                                     for v in vals)
                      else " / ".join(sorted(set(map(str, vals)))))
        out.append(rec)
    return out


def summary_columns() -> list[str]:
    """Column order of ``results_summary.csv``."""
    cols = [*GROUP_COLUMNS, "n_seeds", "seeds", "n_failed"]
    for m in INTERVAL_METRICS:
        cols += [f"{m}_mean", f"{m}_sd", f"{m}_ci_low", f"{m}_ci_high"]
    return cols + list(COST_COLUMNS) + list(DEPLOYMENT_COST_COLUMNS)


def interval_of(rec: dict, metric: str) -> Interval | None:
    """The :class:`Interval` of ``metric`` stored in a summary record (None without values)."""
    mean = num(rec.get(f"{metric}_mean"))
    if mean is None:
        return None
    lo, hi = num(rec.get(f"{metric}_ci_low")), num(rec.get(f"{metric}_ci_high"))
    n = int(rec.get("n_seeds") or 0)
    return Interval(mean, n, num(rec.get(f"{metric}_sd")), lo, hi)


def write_csv_atomic(path: Path, rows: Iterable[dict], cols: list[str]) -> None:
    """Write ``rows`` (columns ``cols``, None as an empty cell) to ``path`` through a tmp file
    renamed over it, so a reader never sees a half-written CSV."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_summary_csv(path: Path, rows: Iterable[dict]) -> list[dict]:
    """Write :func:`summarize` of ``rows`` to ``path`` atomically (tmp file + rename); returns
    the records written."""
    recs = summarize(rows)
    write_csv_atomic(path, recs, summary_columns())
    return recs
