"""The convergence check: does doubling the fine-tuning steps move any configuration's mean?

A protocol that stops before the methods plateau ranks them by learning speed, not by what
they can reach. ``python -m benchmarks.rank_sweep --check-convergence`` therefore reruns the
grid with twice the steps (``<out>/steps_x2``, the same seeds, each method at the rate chosen
for the first run, so only the step count differs) and compares, per configuration, the mean
target accuracy at twice the steps with the 95% interval of the first run. ``converged`` is
"the doubled mean lies inside that interval"; :func:`convergence_markdown` is the table
findings.md shows, and ``convergence.csv`` beside the results holds the records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from benchmarks.sweep.stats import interval_of, summarize, write_csv_atomic

__all__ = ["CONVERGENCE_CSV", "DOUBLED_DIR", "compare_steps", "convergence_markdown",
           "doubled_settings"]

CONVERGENCE_CSV = "convergence.csv"
DOUBLED_DIR = "steps_x2"
_MATCH = ("model", "dataset", "task", "method", "rank", "update_blocks")
COLUMNS = [*_MATCH, "n_seeds", "steps", "steps_x2", "mean", "ci_low", "ci_high", "mean_x2",
           "shift", "converged"]


def doubled_settings(s):
    """``s`` with twice the fine-tuning steps (or epochs, when the run counts epochs)."""
    if s.steps is not None or s.task_steps:
        return dataclasses.replace(s, steps=None if s.steps is None else 2 * s.steps,
                                   task_steps={t: 2 * n for t, n in s.task_steps.items()})
    return dataclasses.replace(s, epochs=2 * s.epochs)


def _steps(rows: Iterable[dict]) -> str:
    vals = sorted({int(r["steps"]) for r in rows if r.get("steps") not in (None, "")})
    return "/".join(map(str, vals))


def compare_steps(base: Iterable[dict], doubled: Iterable[dict]) -> list[dict]:
    """One record per configuration of ``base`` that ``doubled`` also ran: its target
    accuracy interval, the doubled run's mean, their difference (``shift``) and whether the
    doubled mean lies inside the interval (``converged``; None with one seed)."""
    base, doubled = list(base), list(doubled)
    key = lambda r: tuple(r.get(c) for c in _MATCH)  # noqa: E731
    twice = {key(r): r for r in summarize(doubled)}
    out = []
    for rec in summarize(base):
        other = twice.get(key(rec))
        iv, iv2 = interval_of(rec, "target_acc"), (other and interval_of(other, "target_acc"))
        if iv is None or iv2 is None:
            continue
        inside = None if iv.low is None else iv.low - 1e-9 <= iv2.mean <= iv.high + 1e-9
        match = [r for r in base if key(r) == key(rec) and r.get("status") == "ok"]
        match2 = [r for r in doubled if key(r) == key(rec) and r.get("status") == "ok"]
        out.append({**{c: rec.get(c) for c in _MATCH}, "n_seeds": rec["n_seeds"],
                    "steps": _steps(match), "steps_x2": _steps(match2), "mean": iv.mean,
                    "ci_low": iv.low, "ci_high": iv.high, "mean_x2": iv2.mean,
                    "shift": iv2.mean - iv.mean, "converged": inside})
    return out


def write_convergence(path: Path, records: list[dict]) -> None:
    write_csv_atomic(path, records, COLUMNS)


def convergence_markdown(records: list[dict]) -> str:
    """The findings section: how many configurations stayed inside their interval, the
    largest moves, and every configuration that left it."""
    checked = [r for r in records if r["converged"] is not None]
    if not checked:
        return ""
    left = [r for r in checked if not r["converged"]]
    shifts = sorted(checked, key=lambda r: -abs(r["shift"]))
    med = sorted(abs(r["shift"]) for r in checked)[len(checked) // 2]
    pairs = {r["task"]: f"{r['steps_x2']} instead of {r['steps']}" for r in checked}
    steps = (next(iter(pairs.values())) if len(set(pairs.values())) == 1
             else ", ".join(f"{v} for {t}" for t, v in pairs.items()))
    lines = [
        f"Every configuration was rerun with twice the steps ({steps}; same seeds, same chosen "
        "rates): "
        f"**{len(checked) - len(left)} of {len(checked)}** means stay inside the 95% interval "
        f"of the first run (median move {100 * med:.1f} points, largest "
        f"{100 * abs(shifts[0]['shift']):.1f}: {_label(shifts[0])}).",
    ]
    if left:
        lines += ["", "Outside their interval (not converged at the sweep's step count):", "",
                  "| configuration | mean [95% CI] | at 2x steps | move |", "|---|---|---|---|"]
        lines += [f"| {_label(r)} | {100 * r['mean']:.1f} [{100 * r['ci_low']:.1f}, "
                  f"{100 * r['ci_high']:.1f}] | {100 * r['mean_x2']:.1f} | "
                  f"{100 * r['shift']:+.1f} |" for r in left]
    return "\n".join(lines)


def _label(r: dict) -> str:
    rank = "" if r.get("rank") in (None, "") else f" r={r['rank']}"
    k = "" if r.get("update_blocks") in (None, "") else f" K={r['update_blocks']}"
    return f"{r['model']} {r['task']} {r['method']}{rank}{k}"


def read_records(path: Path) -> list[dict]:
    """The records of a ``convergence.csv`` (numbers parsed, ``converged`` a bool or None)."""
    import csv

    out = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            rec: dict = dict(r)
            for c in ("mean", "ci_low", "ci_high", "mean_x2", "shift"):
                rec[c] = float(r[c]) if r.get(c) not in (None, "") else None
            rec["converged"] = {"True": True, "False": False}.get(r.get("converged"))
            out.append(rec)
    return out
