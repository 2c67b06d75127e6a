"""Does a rerun reproduce a reference sweep? Costs exactly, accuracies within the intervals.

    python -m benchmarks.compare_runs plots/rank_sweep_default.csv results/rank_sweep

Both arguments are results (a ``results.csv`` / ``results.jsonl`` or a sweep's ``--out``
folder); each is folded over its seeds with :func:`benchmarks.sweep.stats.summarize`.

What "reproduces" means here. The cost of an update depends on shapes only, so every cost
column (FLOPs by pass, torch's count, peak memory, trainable parameters, adapter bytes; not the
step time) must be **equal**. Accuracies are not bit-reproducible across CPU models (float
rounding in pretraining, amplified by training; docs/reproducibility.md), so an accuracy
reproduces when the rerun's mean over seeds lies inside the reference's 95% interval.

Even a perfect reproduction puts some means outside: the rerun's mean is itself noisy, so
``mean' - mean`` has twice the variance the interval was built for. With ``n`` seeds on both
sides and one spread, ``(mean' - mean) / (s sqrt(2 / n))`` is Student-t with ``n - 1`` degrees of
freedom, and a rerun mean falls outside with probability
``P(|T| > t(0.975, n - 1) / sqrt(2))``: 9.3% at 3 seeds, 14.4% at 10, 16.6% in the limit
(:func:`chance_outside`; more seeds narrow the interval faster than the rerun's own noise).
The verdict allows as many outside as a binomial draw at that rate reaches with 95%
probability (:func:`allowed_outside`). An accuracy's interval is cut to 0..100%
(:mod:`benchmarks.sweep.stats`): a rerun's mean cannot fall in the cut part, so the rate holds.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.sweep.results import load_results
from benchmarks.sweep.stats import (
    CONFIDENCE,
    COST_COLUMNS,
    GROUP_COLUMNS,
    Interval,
    interval_of,
    num,
    summarize,
    t_cdf_two_sided,
    t_quantile,
)

__all__ = ["CHECKED_COSTS", "AccuracyCheck", "RunComparison", "allowed_outside",
           "chance_outside", "compare_runs", "main"]

CHECKED_COSTS: tuple[str, ...] = tuple(c for c in COST_COLUMNS if c != "step_time_s")
"""Cost columns that must be equal in a reproduction (time is the machine's, not the run's)."""


def chance_outside(n_seeds: int, confidence: float = CONFIDENCE) -> float:
    """Probability that a faithful rerun's mean over ``n_seeds`` falls outside the reference's
    ``confidence`` t-interval over as many seeds (see the module docstring)."""
    if n_seeds < 2:
        raise ValueError(f"an interval needs at least 2 seeds, got {n_seeds}")
    df = n_seeds - 1
    return 1.0 - t_cdf_two_sided(t_quantile(df, confidence) / math.sqrt(2), df)


def allowed_outside(n: int, p: float, level: float = 0.95) -> int:
    """Smallest ``k`` with ``P(Binomial(n, p) <= k) >= level``: how many of ``n`` checks may
    fail by chance alone, each with probability ``p``."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= level:
            return k
    return n


@dataclass(frozen=True)
class AccuracyCheck:
    """One configuration's ``metric`` in both runs: is the rerun mean inside the reference's
    interval?"""

    group: tuple  # benchmarks.sweep.stats.GROUP_COLUMNS values
    metric: str
    reference: Interval
    rerun: Interval

    @property
    def inside(self) -> bool | None:
        """None when the reference has no interval (one seed)."""
        r = self.reference
        return None if r.low is None else r.low <= self.rerun.mean <= r.high

    @property
    def label(self) -> str:
        g = dict(zip(GROUP_COLUMNS, self.group, strict=True))
        rank = f" r={g['rank']}" if g["rank"] is not None else ""
        if g.get("update_blocks") is not None:
            rank += f" K={g['update_blocks']}"
        return f"{g['model']} {g['task']} {g['method']}{rank}"


@dataclass
class RunComparison:
    """What :func:`compare_runs` found; :attr:`reproduced` is the verdict."""

    accuracy: list[AccuracyCheck] = field(default_factory=list)
    cost_mismatches: list[tuple[tuple, str, object, object]] = field(default_factory=list)
    only_reference: list[tuple] = field(default_factory=list)
    only_rerun: list[tuple] = field(default_factory=list)
    shared: int = 0  # configurations in both runs, whose costs were compared

    @property
    def checked(self) -> list[AccuracyCheck]:
        return [c for c in self.accuracy if c.inside is not None]

    @property
    def outside(self) -> list[AccuracyCheck]:
        return [c for c in self.checked if not c.inside]

    @property
    def expected_outside_rate(self) -> float | None:
        """Mean :func:`chance_outside` over the checked configurations."""
        rates = [chance_outside(min(c.reference.n, c.rerun.n)) for c in self.checked
                 if min(c.reference.n, c.rerun.n) >= 2]
        return sum(rates) / len(rates) if rates else None

    @property
    def allowed(self) -> int:
        p = self.expected_outside_rate
        return 0 if p is None else allowed_outside(len(self.checked), p)

    @property
    def reproduced(self) -> bool:
        """At least one shared configuration, every shared configuration's costs equal, none
        missing on either side, and no more accuracies outside than chance allows (runs with
        no accuracy, profile-only ones, reproduce on their costs alone)."""
        return (not self.cost_mismatches and not self.only_reference and not self.only_rerun
                and self.shared > 0 and len(self.outside) <= self.allowed)

    def markdown(self) -> str:
        lines = ["| configuration | metric | reference | rerun | rerun mean inside |",
                 "|---|---|---|---|---|"]
        for c in self.accuracy:
            mark = "-" if c.inside is None else ("yes" if c.inside else "**no**")
            lines.append(f"| {c.label} | {c.metric} | {c.reference.format()} | "
                         f"{c.rerun.format()} | {mark} |")
        p = self.expected_outside_rate
        if self.accuracy:
            lines += ["", f"Accuracy: {len(self.outside)} of {len(self.checked)} rerun means "
                      f"outside the reference's 95% interval"
                      + (f" (a faithful rerun: {100 * p:.1f}% expected, up to {self.allowed} "
                         f"allowed)" if p is not None else "") + "."]
        else:
            lines = ["Accuracy: none in both runs (profile-only rows): costs alone compared."]
        n_groups = self.shared
        if not n_groups:
            lines.append("Costs: no configuration is in both runs, so nothing was compared.")
        elif self.cost_mismatches:
            lines.append(f"Costs: {len(self.cost_mismatches)} values differ:")
            lines += [f"- {dict(zip(GROUP_COLUMNS, g, strict=True))} {col}: {a} vs {b}"
                      for g, col, a, b in self.cost_mismatches]
        else:
            lines.append(f"Costs: equal in all {n_groups} shared configurations "
                         f"({', '.join(CHECKED_COSTS)}).")
        for name, keys in (("only in the reference", self.only_reference),
                           ("only in the rerun", self.only_rerun)):
            if keys:
                lines.append(f"{len(keys)} configurations {name}: "
                             + "; ".join(map(str, keys[:5])) + (" ..." if len(keys) > 5 else ""))
        lines.append("Verdict: " + ("reproduced." if self.reproduced else "NOT reproduced."))
        return "\n".join(lines)


def _same(a: object, b: object) -> bool:
    x, y = num(a), num(b)
    if x is None or y is None:
        return x is None and y is None
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0)


def compare_runs(reference: Sequence[dict], rerun: Sequence[dict],
                 metrics: Sequence[str] = ("target_acc",)) -> RunComparison:
    """Compare two sweeps' rows (one row per configuration and seed, as the sweep writes)."""
    ref = {tuple(r[c] for c in GROUP_COLUMNS): r for r in summarize(reference)}
    new = {tuple(r[c] for c in GROUP_COLUMNS): r for r in summarize(rerun)}
    out = RunComparison(only_reference=[k for k in ref if k not in new],
                        only_rerun=[k for k in new if k not in ref])
    for key, a in ref.items():
        b = new.get(key)
        if b is None:
            continue
        out.shared += 1
        out.cost_mismatches += [(key, c, a.get(c), b.get(c)) for c in CHECKED_COSTS
                                if not _same(a.get(c), b.get(c))]
        for m in metrics:
            ia, ib = interval_of(a, m), interval_of(b, m)
            if ia is not None and ib is not None:
                out.accuracy.append(AccuracyCheck(key, m, ia, ib))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_runs",
        description="Check that a rerun of the sweep reproduces a reference run: cost columns "
                    "equal, each configuration's mean accuracy inside the reference's 95%% "
                    "interval (as many outside as chance allows). Exit 0 when reproduced, 1 "
                    "when not.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("reference", help="reference results: results.csv/.jsonl or a sweep's --out "
                                     "folder, e.g. plots/rank_sweep_default.csv")
    p.add_argument("rerun", help="the rerun's results, e.g. results/rank_sweep")
    p.add_argument("--metrics", default="target_acc",
                   help="comma-separated accuracy fields to check (target_acc, source_acc, "
                        "zero_shot_acc, forgetting)")
    a = p.parse_args(argv)
    try:
        ref, new = load_results(a.reference), load_results(a.rerun)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    res = compare_runs(ref, new, [m.strip() for m in a.metrics.split(",") if m.strip()])
    print(res.markdown())
    return 0 if res.reproduced else 1


if __name__ == "__main__":
    sys.exit(main())
