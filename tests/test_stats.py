"""Accuracy intervals over seeds: t quantiles, intervals, comparisons, the summary table, and
what findings.md says when intervals overlap or separate (rows constructed by hand)."""

from __future__ import annotations

import csv
import math

import pytest

from benchmarks.sweep.findings import findings_markdown
from benchmarks.sweep.stats import (
    Interval,
    compare,
    compare_paired,
    interval,
    paired_interval,
    summarize,
    summary_columns,
    t_cdf_two_sided,
    t_quantile,
    write_summary_csv,
)


@pytest.mark.parametrize("df, t", [(1, 12.706205), (2, 4.302653), (3, 3.182446),
                                   (4, 2.776445), (9, 2.262157), (29, 2.045230),
                                   (1000, 1.962339)])
def test_t_quantile_matches_the_tables(df, t):
    assert t_quantile(df) == pytest.approx(t, abs=1e-6)
    assert t_cdf_two_sided(t, df) == pytest.approx(0.95, abs=1e-6)


def test_t_quantile_other_confidences_and_bad_input():
    assert t_quantile(5, 0.90) == pytest.approx(2.015048, abs=1e-6)
    assert t_quantile(10, 0.99) == pytest.approx(3.169273, abs=1e-6)
    with pytest.raises(ValueError, match="integer >= 1"):
        t_cdf_two_sided(1.0, 0)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        t_quantile(3, 1.5)


def test_interval_of_known_values():
    iv = interval([0.80, 0.85, 0.90])
    assert iv.mean == pytest.approx(0.85) and iv.n == 3
    assert iv.sd == pytest.approx(0.05)
    half = 4.302653 * 0.05 / math.sqrt(3)  # 0.124207
    assert (iv.low, iv.high) == (pytest.approx(0.85 - half), pytest.approx(0.85 + half))
    assert iv.half_width == pytest.approx(half)
    assert iv.format() == "85.0% [72.6, 97.4]"
    same = interval([0.5] * 4)  # no spread: a zero-width interval, not a crash
    assert (same.low, same.high, same.sd) == (0.5, 0.5, 0.0)
    one = interval([0.7])
    assert (one.sd, one.low, one.high) == (None, None, None)
    assert one.format() == "70.0% (1 seed)"
    with pytest.raises(ValueError, match="at least one"):
        interval([])


def test_compare_ranks_only_separated_intervals():
    a = Interval(0.8, 3, 0.01, 0.78, 0.82)
    assert compare(a, Interval(0.7, 3, 0.01, 0.68, 0.72)) == 1
    assert compare(Interval(0.7, 3, 0.01, 0.68, 0.72), a) == -1
    assert compare(a, Interval(0.77, 3, 0.01, 0.75, 0.79)) == 0  # overlap
    assert compare(a, Interval(0.5, 1, None, None, None)) is None  # one seed: no verdict


def _row(model, task, method, rank, seed, acc, *, status="ok", src=0.9, **kw):
    rank_s = "-" if rank is None else str(rank)
    return {"key": f"{model}|digits|{task}|{method}|{rank_s}|{seed}|sig", "model": model,
            "dataset": "digits", "task": task, "method": method, "rank": rank, "seed": seed,
            "settings_signature": "sig", "status": status, "target_acc": acc,
            "source_acc": src, "zero_shot_acc": 0.2, "forgetting": 0.1, "flops_total": 1000,
            "memory_peak": 2**20, "trainable_params": 10, **kw}


def test_summary_table_columns_and_values(tmp_path):
    rows = [_row("m", "shift", "full", None, s, a) for s, a in enumerate((0.80, 0.85, 0.90))]
    rows += [_row("m", "shift", "lora", 4, 0, 0.6), _row("m", "shift", "lora", 4, 1, None,
                                                        status="failed")]
    rows.append({"key": "loose", "status": "ok"})  # not a sweep row: left out
    path = tmp_path / "results_summary.csv"
    recs = write_summary_csv(path, rows)
    assert recs == summarize(rows) and len(recs) == 2
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == summary_columns()
        table = list(reader)
    for col in ("model", "dataset", "task", "method", "rank", "settings_signature", "n_seeds",
                "seeds", "n_failed", "target_acc_mean", "target_acc_sd", "target_acc_ci_low",
                "target_acc_ci_high", "source_acc_mean", "forgetting_ci_high", "flops_total",
                "memory_peak"):
        assert col in reader.fieldnames, col
    full, lora = table
    assert (full["method"], full["rank"], full["n_seeds"], full["seeds"], full["n_failed"]) == (
        "full", "", "3", "0 1 2", "0")
    assert float(full["target_acc_mean"]) == pytest.approx(0.85)
    assert float(full["target_acc_ci_low"]) == pytest.approx(0.85 - 0.124207, abs=1e-6)
    assert float(full["flops_total"]) == 1000
    # one ok seed: a mean but no interval; the failed seed is counted, not averaged
    assert (lora["rank"], lora["n_seeds"], lora["n_failed"]) == ("4", "1", "1")
    assert float(lora["target_acc_mean"]) == pytest.approx(0.6)
    assert lora["target_acc_ci_low"] == lora["target_acc_sd"] == ""


def _accuracy_rows() -> list[dict]:
    accs = {("full", None): (0.80, 0.82, 0.84),
            ("lora", 1): (0.50, 0.52, 0.54),   # far below full FT: intervals separate
            ("lora", 4): (0.79, 0.83, 0.81)}   # overlaps full FT: indistinguishable
    return [_row("m", "shift", meth, rank, s, a) for (meth, rank), vals in accs.items()
            for s, a in enumerate(vals)]


def test_findings_rank_only_where_intervals_separate():
    md = findings_markdown(_accuracy_rows())
    assert "## 3. Accuracy after adaptation" in md
    assert "mean over 3 seed(s)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("- **m, shift**"))
    assert "highest mean full FT 82.0% [77.0, 87.0]" in line
    assert "indistinguishable from it: LoRA r=4" in line
    assert "below it (the seeds separate them): LoRA r=1" in line
    assert "  - LoRA vs full FT: r=1 below, r=4 indistinguishable." in md
    assert "| m | shift | LoRA |  | 52.0 [47.0, 57.0] | 81.0 [76.0, 86.0] |" in md


def test_findings_say_indistinguishable_when_every_interval_overlaps():
    rows = [r for r in _accuracy_rows() if r["rank"] != 1]
    md = findings_markdown(rows)
    assert "indistinguishable from it: LoRA r=4." in md
    assert "below it" not in md and "r=4 indistinguishable." in md


def test_findings_with_one_seed_rank_nothing():
    rows = [r for r in _accuracy_rows() if r["seed"] == 0]
    md = findings_markdown(rows)
    assert "no intervals, no ranking" in md and "`--seeds 3`" in md
    assert "below" not in md.split("## 3.")[1]


def test_paired_interval_uses_the_shared_seeds_only():
    a = {0: 0.60, 1: 0.80, 2: 0.70, 5: 0.10}
    b = {0: 0.55, 1: 0.74, 2: 0.66, 3: 0.90}
    d = paired_interval(a, b)  # seeds 0, 1, 2: differences 0.05, 0.06, 0.04
    assert d.n == 3 and d.mean == pytest.approx(0.05)
    assert d.low == pytest.approx(0.05 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-7)
    assert compare_paired(d) == 1 and compare_paired(paired_interval(b, a)) == -1
    assert paired_interval({0: 0.5, 1: 0.6}, {1: 0.4, 2: 0.3}) is None  # one shared seed
    assert compare_paired(None) is None
    assert compare_paired(paired_interval({0: 0.5, 1: 0.7}, {0: 0.6, 1: 0.6})) == 0


def test_findings_pair_configurations_that_share_seeds():
    """Spread over seeds that two configurations share (a weak source model lowers both) hides
    a consistent gap from disjoint-interval tests; the paired test sees it. Without shared
    seeds the same numbers are compared by their intervals and stay indistinguishable."""
    base = (0.60, 0.80, 0.70)
    rows = [_row("m", "shift", "full", None, s, a) for s, a in enumerate(base)]
    rows += [_row("m", "shift", "lora", 4, s, a - 0.03 - 0.001 * s) for s, a in enumerate(base)]
    md = findings_markdown(rows)
    line = next(ln for ln in md.splitlines() if ln.startswith("- **m, shift**"))
    assert "every other configuration is below it" in line
    assert "  - LoRA vs full FT: r=4 below." in md
    shifted = [dict(r, seed=r["seed"] + 10) if r["method"] == "lora" else r for r in rows]
    md = findings_markdown(shifted)
    assert "indistinguishable from it: LoRA r=4" in md and "r=4 indistinguishable." in md


def test_findings_name_the_machine_and_how_bn_was_evaluated():
    """Accuracies are one machine's: findings say which processor measured them (the GPU's
    name only when the rows ran on CUDA) and whether BN statistics were recomputed."""
    rows = _accuracy_rows()
    for r in rows:
        r.update(env_cpu="Example CPU 9000", env_threads=3, env_torch_version="2.9.0",
                 env_device="cpu", env_gpu="Example GPU", precise_bn=True, batch_size=32,
                 resolution=12, bn="train")
    md = findings_markdown(rows)
    assert "on cpu (Example CPU 9000, 3 threads, torch 2.9.0)" in md
    assert "BN statistics recomputed for the final weights" in md and "Example GPU" not in md
    for r in rows:
        r.update(env_device="cuda:0", precise_bn=None)
    md = findings_markdown(rows)
    assert "on cuda:0 (Example GPU, torch 2.9.0)" in md
    assert "evaluated with the BN running averages of training" in md
