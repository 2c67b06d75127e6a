"""``python -m benchmarks.rank_sweep --executor ray`` on a local Ray with 2 CPUs.

The tiny grid of ``test_rank_sweep`` made cheaper still (MobileNetV2 on 8x8 digits, head-only
and BitFit, one short epoch, the source model "pretrained" for 0 epochs: built, evaluated and
cached all the same), with two seeds, so a profile is measured by seed 0 and copied into seed
1's rows, and SqueezeNet next to it, which cannot run on 8x8 images: real failing
configurations. It runs once sequentially and once on Ray, in two steps: seed 0, then both
seeds, resuming (seed 1 copies the profiles seed 0 left on disk, as a resumed sequential run
does). The rows must be identical but for the columns that are times
(``benchmarks.sweep.executor.TIMING_COLUMNS``: wall_time_s, cpu_time_s, finished_at,
source_time_s, source_cpu_time_s, train_time_s, profile_time_s, step_time_s, step_time_iqr_s,
step_cpu_time_s, instrumented_time_s, instrumented_cpu_time_s) and ``source_cached`` (the
sequential run made the source models, so the Ray run finds them in the pretrain cache).
One local Ray serves the whole module. The Ray tests are skipped only when Ray is not
installed (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import pytest

from benchmarks.sweep import cli as sweep_cli
from benchmarks.sweep import runner as rank_sweep
from benchmarks.sweep.executor import RAY_MISSING, TIMING_COLUMNS
from benchmarks.sweep.results import load_results, read_jsonl

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(
    ray is None, reason='Ray is an optional extra, not installed: pip install -e ".[ray]"')

GRID = [
    "--models", "mobilenet_v2,squeezenet1_0", "--tasks", "shift", "--methods", "head,bitfit",
    "--seeds", "2", "--resolution", "8", "--epochs", "1", "--pretrain-epochs", "0",
    "--few-shot", "5", "--test-per-class", "10", "--batch-size", "16",
    "--profile-repeat", "1", "--device", "cpu", "--no-plots", "--executor", "sequential",
    # each method's rate chosen on a validation split: one rate task per method on Ray, its
    # rate and grid equal to the sequential run's (and reused when the Ray run resumes)
    "--lr-grid", "1,3", "--val-per-class", "3",
]
NOT_COMPARED = TIMING_COLUMNS | {"source_cached"}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The sequential run and the Ray run (a first step on seed 0 only, then both seeds,
    resuming) of the same grid, on one local Ray with 2 CPUs."""
    if ray is None:
        pytest.skip('Ray is an optional extra, not installed: pip install -e ".[ray]"')
    root = tmp_path_factory.mktemp("ray_sweep")
    mp = pytest.MonkeyPatch()
    # before ray.init: the workers inherit the environment of the Ray it starts
    mp.setenv("CONVPEFT_CACHE", str(root / "cache"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        seq, on_ray = root / "seq", root / "ray"
        assert rank_sweep.main([*GRID, "--out", str(seq)]) == 0
        assert rank_sweep.main([*GRID, "--executor", "ray", "--out", str(on_ray),
                                "--seeds", "0,"]) == 0
        first = {r["key"]: r for r in load_results(on_ray)}
        assert rank_sweep.main([*GRID, "--executor", "ray", "--out", str(on_ray)]) == 0
        yield {"seq": seq, "ray": on_ray, "first": first}
    finally:
        ray.shutdown()
        mp.undo()


@needs_ray
def test_ray_rows_equal_sequential_rows_but_for_times(sweeps):
    seq, on_ray = load_results(sweeps["seq"]), load_results(sweeps["ray"])
    assert len(seq) == len(on_ray) == 8  # 2 models x (head + bitfit) x 2 seeds
    by_key = {r["key"]: r for r in on_ray}
    assert by_key.keys() == {r["key"] for r in seq}
    compared = 0
    for r in seq:
        other = by_key[r["key"]]
        assert r.keys() == other.keys(), r["key"]
        differ = {k for k in r if k not in NOT_COMPARED and r[k] != other[k]}
        assert not differ, (r["key"], {k: (r[k], other[k]) for k in differ})
        compared += len(r.keys() - NOT_COMPARED)
    assert compared > 8 * 50  # accuracies, FLOPs, memory, sizes, env, ... all compared
    ok = [r for r in on_ray if r["status"] == "ok"]
    assert {r["profile_seed"] for r in ok} == {0}  # seed 1 copied seed 0's profile
    assert all(0 <= r["target_acc"] <= 1 for r in ok)
    # one rate per method, chosen on seed 0 and trained by both seeds (the comparison above:
    # the same rate and grid as the sequential run's)
    assert {r["lr_source"] for r in ok} == {"tuned"}
    for method in ("head", "bitfit"):
        mine = [r for r in ok if r["method"] == method]
        assert len({(r["lr"], r["lr_grid_val"], r["lr_tuned_on"]) for r in mine}) == 1


@needs_ray
def test_ray_failing_configuration_gives_a_failed_row_and_the_others_succeed(sweeps):
    rows = load_results(sweeps["ray"])
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["model"] for r in failed} == {"squeezenet1_0"} and len(failed) == 4
    assert all("too small" in r["error"] for r in failed)
    assert [r["status"] for r in rows if r["model"] == "mobilenet_v2"] == ["ok"] * 4
    log = (sweeps["ray"] / "errors.log").read_text()
    assert log.count("== squeezenet1_0") >= 4 and "Traceback" in log


@needs_ray
def test_ray_resume_skips_done_rows_and_writes_in_grid_order(sweeps):
    lines = read_jsonl(sweeps["ray"] / "results.jsonl")
    first = sweeps["first"]
    # step 1 wrote the 4 seed-0 rows; step 2 kept the 2 ok ones, retried the 2 failed ones
    assert len(first) == 4 and len(lines) == 4 + 6
    ok_first = {k: r for k, r in first.items() if r["status"] == "ok"}
    assert len(ok_first) == 2
    after = {r["key"]: r for r in load_results(sweeps["ray"])}
    for k, r in ok_first.items():
        assert after[k] == r  # untouched
    # the second step's rows came in the grid's order, as a sequential run writes them
    seq_order = [r["key"] for r in read_jsonl(sweeps["seq"] / "results.jsonl")]
    step2 = [r["key"] for r in lines[4:]]
    assert step2 == [k for k in seq_order if k not in ok_first]


@needs_ray
def test_ray_resume_with_nothing_left_to_run(sweeps, capsys):
    out = sweeps["ray"]
    n = len(read_jsonl(out / "results.jsonl"))
    rc = rank_sweep.main([*GRID, "--executor", "ray", "--out", str(out),
                          "--models", "mobilenet_v2"])
    assert rc == 0
    assert "(4 already done, 0 to run)" in capsys.readouterr().out
    assert len(read_jsonl(out / "results.jsonl")) == n


def test_executor_flags_are_checked_before_running(tmp_path, capsys, monkeypatch):
    base = [*GRID, "--out", str(tmp_path)]
    for extra, needle in ((["--address", "auto"], "needs --executor ray"),
                          (["--executor", "ray", "--cpus-per-task", "0"], "must be > 0")):
        with pytest.raises(SystemExit) as e:
            rank_sweep.main([*base, *extra])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    monkeypatch.setattr(sweep_cli, "_ray_installed", lambda: False)
    with pytest.raises(SystemExit) as e:
        rank_sweep.main([*base, "--executor", "ray"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert RAY_MISSING in err and 'pip install -e ".[ray]"' in err
