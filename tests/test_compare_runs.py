"""benchmarks.sweep.compare_runs: a rerun reproduces a reference when costs are equal and accuracies
fall inside the reference's intervals as often as chance allows (rows built by hand)."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.sweep.compare_runs import allowed_outside, chance_outside, compare_runs, main
from benchmarks.sweep.results import write_csv
from benchmarks.sweep.stats import interval, t_quantile

CONFIGS = [("mobilenet_v2", "shift", "full", None), ("mobilenet_v2", "shift", "lora", 4),
           ("resnet18", "new_classes", "lora", 16), ("resnet18", "new_classes", "head", None)]


def _rows(accs: dict[tuple, list[float]], *, flops: int = 1000, step_time: float = 0.5,
          skip: tuple | None = None) -> list[dict]:
    rows = []
    for cfg, vals in accs.items():
        if cfg == skip:
            continue
        model, task, method, rank = cfg
        for seed, v in enumerate(vals):
            rows.append(dict(key=f"{model}|{task}|{method}|{rank}|{seed}", model=model,
                             dataset="digits", task=task, method=method, rank=rank, seed=seed,
                             settings_signature="abc", status="ok", target_acc=v,
                             flops_total=flops, memory_peak=4096, trainable_params=10,
                             step_time_s=step_time))
    return rows


BASE = {c: [0.50 + 0.05 * i, 0.55 + 0.05 * i, 0.60 + 0.05 * i] for i, c in enumerate(CONFIGS)}


def test_chance_outside_matches_the_closed_form_and_a_simulation():
    # df = 2: P(|T| <= t) = t / sqrt(t^2 + 2)
    t = t_quantile(2) / math.sqrt(2)
    assert chance_outside(3) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-9)
    rng = random.Random(0)
    trials, out = 20000, 0
    for _ in range(trials):
        ref = interval([rng.gauss(0, 1) for _ in range(3)])
        rerun_mean = sum(rng.gauss(0, 1) for _ in range(3)) / 3
        out += not ref.low <= rerun_mean <= ref.high
    assert out / trials == pytest.approx(chance_outside(3), abs=0.01)  # 4 sd of the estimate
    assert chance_outside(3) < chance_outside(10) < 1 - math.erf(1.959964 / 2)  # limit 16.6%
    with pytest.raises(ValueError, match="at least 2 seeds"):
        chance_outside(1)


def test_allowed_outside_is_the_binomial_95th_percentile():
    n, p = 48, chance_outside(3)
    k = allowed_outside(n, p)

    def cdf(k):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    assert cdf(k) >= 0.95 > cdf(k - 1)
    assert allowed_outside(10, 0.0) == 0


def test_identical_runs_reproduce():
    res = compare_runs(_rows(BASE), _rows(BASE))
    assert res.reproduced and not res.outside and len(res.checked) == len(CONFIGS)
    assert "Verdict: reproduced." in res.markdown()


def test_time_may_differ_but_a_cost_may_not():
    assert compare_runs(_rows(BASE), _rows(BASE, step_time=9.0)).reproduced
    res = compare_runs(_rows(BASE), _rows(BASE, flops=1001))
    assert not res.reproduced
    assert {m[1] for m in res.cost_mismatches} == {"flops_total"}
    assert "NOT reproduced" in res.markdown() and "flops_total: 1000 vs 1001" in res.markdown()


def test_accuracies_that_moved_are_counted_and_fail_the_verdict():
    moved = {c: [v + 0.3 for v in vals] for c, vals in BASE.items()}
    res = compare_runs(_rows(BASE), _rows(moved))
    assert len(res.outside) == len(CONFIGS) > res.allowed
    assert not res.reproduced
    one = dict(BASE)
    one[CONFIGS[0]] = [v + 0.3 for v in BASE[CONFIGS[0]]]
    res = compare_runs(_rows(BASE), _rows(one))
    assert [c.group[3] for c in res.outside] == ["full"]
    assert res.reproduced == (1 <= res.allowed)


def test_a_configuration_missing_on_either_side_is_named():
    res = compare_runs(_rows(BASE), _rows(BASE, skip=CONFIGS[1]))
    assert res.only_reference == [("mobilenet_v2", "digits", "shift", "lora", 4, None, "abc")]
    assert not res.reproduced and "only in the reference" in res.markdown()


def test_cli_on_csv_files(tmp_path, capsys):
    write_csv(tmp_path / "ref.csv", _rows(BASE))
    run = tmp_path / "run"
    run.mkdir()
    write_csv(run / "results.csv", _rows(BASE))
    assert main([str(tmp_path / "ref.csv"), str(run)]) == 0
    assert "Verdict: reproduced." in capsys.readouterr().out
    write_csv(run / "results.csv", _rows(BASE, flops=7))
    assert main([str(tmp_path / "ref.csv"), str(run)]) == 1
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "ref.csv"), str(tmp_path / "nowhere")])
    assert e.value.code == 2
