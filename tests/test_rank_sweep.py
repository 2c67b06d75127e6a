"""End-to-end tests of ``python -m benchmarks.rank_sweep`` on a tiny grid, plus its pieces.

The tiny grid: MobileNetV2 (small_input) on digits at 8x8, shift task, full FT and LoRA at
ranks 1 and 2, one short epoch on 5 images per class, the source model pretrained for one epoch
(cached in a per-session folder), one seed (the default grid's several seeds are tested with
--profile-only, where a seed costs little). A second model, SqueezeNet, cannot run on 8x8
images (its pooling shrinks the map to nothing): real failing configurations next to the good
ones.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.plots.make import main as plot_main
from benchmarks.plots.make import pareto_front
from benchmarks.sweep import runner as rank_sweep
from benchmarks.sweep.findings import findings_markdown
from benchmarks.sweep.grid import PRESETS, Config, SweepSettings, expand_grid, parse_dataset
from benchmarks.sweep.results import ResultsStore, flatten, load_results, read_jsonl

from conftest import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]



def tiny(models: str = "mobilenet_v2,squeezenet1_0", methods: str = "full,lora",
         ranks: str = "1,2") -> list[str]:
    """CLI arguments of the tiny grid (a few seconds per configuration on a laptop CPU)."""
    return [
        "--models", models, "--tasks", "shift", "--methods", methods, "--ranks", ranks,
        "--resolution", "8", "--epochs", "1", "--pretrain-epochs", "1", "--few-shot", "5",
        "--test-per-class", "10", "--batch-size", "16", "--profile-repeat", "1", "--device", "cpu",
        "--formats", "png,svg", "--seeds", "1",  # one seed: seed 0
        "--cost-at", "2x64",  # deployment costs at a small size: seconds, not minutes
        # in this process, each method at its default rate (the protocol's own tests:
        # tests/test_protocol.py)
        "--executor", "sequential", "--lr-grid", "off",
    ]


TINY = tiny()

PROFILE_COLUMNS = {
    "flops_forward", "flops_backward", "flops_backward_input", "flops_backward_weight",
    "flops_optimizer", "flops_total", "flops_torch", "flops_elementwise", "memory_peak",
    "step_time_s", "memory_by_category_params", "memory_by_category_grads",
    "memory_by_category_optimizer", "memory_by_category_activations",
}
EXPECTED_COLUMNS = PROFILE_COLUMNS | {
    "key", "model", "dataset", "task", "method", "rank", "seed", "status", "error",
    "zero_shot_acc", "target_acc", "source_acc", "trainable_params", "total_params",
    "adapter_bytes", "wall_time_s", "env_convpeft_version", "env_torch_version",
    "env_git_commit", "env_cpu", "env_gpu", "env_threads", "corruption", "severity", "bn",
    "cost_batch", "cost_resolution", "cost_device", "cost_source", "cost_memory_peak",
    "cost_flops_total", "cost_trainable_params", "cost_memory_vs_full",
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convpeft_cache")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """Run the tiny sweep once in-process; every end-to-end test reads its output."""
    root = tmp_path_factory.mktemp("sweep")
    out, plots = root / "out", root / "plots"
    mp = pytest.MonkeyPatch()
    mp.setenv("CONVPEFT_CACHE", str(cache_dir))
    try:
        rc = rank_sweep.main([*TINY, "--out", str(out), "--plots", str(plots)])
    finally:
        mp.undo()
    return {"rc": rc, "out": out, "plots": plots, "rows": read_jsonl(out / "results.jsonl")}


# ----------------------------------------------------------------------------- grid & CLI


def test_grid_ranks_apply_only_to_low_rank_methods():
    grid = expand_grid(["m1", "m2"], ["shift", "new_classes"], ["full", "head", "bitfit", "lora",
                       "dora", "galore"], [1, 4, 16], [0])
    per_group = 3 + 3 * 3  # full/head/bitfit once; lora/dora/galore at 3 ranks
    assert len(grid) == 2 * 2 * per_group
    assert all(c.rank is None for c in grid if c.method in ("full", "head", "bitfit"))
    assert sorted({c.rank for c in grid if c.method == "dora"}) == [1, 4, 16]
    # grouped by (model, task, seed) so a source model is built once per group
    groups = [(c.model, c.task, c.seed) for c in grid]
    assert groups == sorted(groups, key=groups.index)
    # duplicates dropped
    assert len(expand_grid(["m"], ["shift"], ["lora", "lora"], [2, 2], [0, 0])) == 1
    with pytest.raises(ValueError, match="ranks"):
        expand_grid(["m"], ["shift"], ["lora"], [], [0])


def test_keys_depend_on_settings_not_on_device():
    cfg = Config("mobilenet_v2", "shift", "lora", 4, 0)
    a = SweepSettings(dataset={"shift": "digits"}, epochs=1)
    assert cfg.key(a) == cfg.key(SweepSettings(dataset={"shift": "digits"}, epochs=1,
                                               device="cuda", data_root="/x"))
    assert cfg.key(a) != cfg.key(SweepSettings(dataset={"shift": "digits"}, epochs=2))
    assert cfg.key(a) != Config("mobilenet_v2", "shift", "lora", 8, 0).key(a)


def test_parse_dataset():
    assert parse_dataset("digits", ["shift", "new_classes"]) == {
        "shift": "digits", "new_classes": "digits"}
    assert parse_dataset("shift=cifar10,new_classes=cifar100", ["shift", "new_classes"]) == {
        "shift": "cifar10", "new_classes": "cifar100"}
    with pytest.raises(ValueError, match="new_classes"):
        parse_dataset("shift=cifar10", ["shift", "new_classes"])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        rank_sweep.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--models", "--methods", "--ranks", "--tasks", "--dataset", "--data-root",
                 "--corruption", "--severity", "--epochs", "--batch-size", "--resolution",
                 "--seeds", "--bn", "--out", "--plots", "--profile-only", "--device",
                 "--preset", "--target"):
        assert flag in text, flag


def test_presets_and_bad_flags(capsys):
    assert rank_sweep.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    n_seeds = len(PRESETS["default"].seeds)
    assert n_seeds >= 3  # enough seeds for an interval on every accuracy
    # 2 models x 2 tasks x (3 + 3 methods x 3 ranks) x seeds
    assert f"{48 * n_seeds} configurations" in out
    assert rank_sweep.main(["--preset", "paper", "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "|cifar10|shift|" in out and "|cifar100|new_classes|" in out
    assert "resnet50|cifar10|shift|lora|64|" in out
    for bad in (["--methods", "lora,nope"], ["--ranks", "0"], ["--severity", "7"],
                ["--tasks", "shift,bogus"]):
        with pytest.raises(SystemExit) as e:
            rank_sweep.main([*bad, "--dry-run"])
        assert e.value.code == 2


def test_seeds_flag_takes_a_count_or_a_list(capsys):
    parse = rank_sweep.build_parser().parse_args
    assert parse(["--seeds", "3"]).seeds == [0, 1, 2]
    assert parse(["--seeds", "0,4,2"]).seeds == [0, 4, 2]
    assert parse(["--seeds", "7,"]).seeds == [7]
    for bad, why in (("0", "must be >= 1"), ("x", "number of seeds"), ("1,-2", ">= 0")):
        with pytest.raises(SystemExit) as e:
            parse(["--seeds", bad])
        assert e.value.code == 2
        assert why in capsys.readouterr().err


# ----------------------------------------------------------------------------- results I/O


def test_store_survives_a_torn_last_line(tmp_path):
    st = ResultsStore(tmp_path)
    st.add({"key": "a", "status": "ok", "x": 1.5})
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"key": "b", "status": "o')  # a hard kill mid-write
    st2 = ResultsStore(tmp_path)
    assert st2.done_keys() == {"a"}
    st2.add({"key": "c", "status": "failed", "error": "boom", "nan": float("nan")})
    rows = load_results(tmp_path / "results.jsonl")
    assert [r["key"] for r in rows] == ["a", "c"]
    assert rows[1]["nan"] is None  # strict JSON: NaN written as null
    csv_rows = load_results(tmp_path / "results.csv")
    assert [r["key"] for r in csv_rows] == ["a", "c"] and csv_rows[0]["x"] == 1.5


def test_flatten_nested_profile_dict():
    d = flatten({"a": 1, "memory_by_category": {"params": 2, "grads": 3}, "per_layer": [1]})
    assert d == {"a": 1, "memory_by_category_params": 2, "memory_by_category_grads": 3}


def test_pareto_front():
    pts = [(10.0, 0.5), (20.0, 0.9), (15.0, 0.4), (30.0, 0.9), (5.0, 0.2), (25.0, 0.95)]
    assert pareto_front(pts) == [4, 0, 1, 5]


# ----------------------------------------------------------------------------- end to end


def test_sweep_writes_rows_with_expected_columns(sweep):
    assert sweep["rc"] == 0
    out = sweep["out"]
    with (out / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        csv_rows = list(reader)
    missing = EXPECTED_COLUMNS - cols
    assert not missing, missing
    rows = sweep["rows"]
    assert len(rows) == len(csv_rows) == 6  # 3 configs x 2 models (one fails)
    ok = [r for r in rows if r["model"] == "mobilenet_v2"]
    assert [(r["method"], r["rank"]) for r in ok] == [("full", None), ("lora", 1), ("lora", 2)]
    for r in ok:
        assert r["status"] == "ok" and r["error"] is None
        assert r["flops_total"] > 0 and r["memory_peak"] > 0 and r["flops_torch"] > 0
        assert r["flops_total"] == (r["flops_forward"] + r["flops_backward"]
                                    + r["flops_optimizer"])
        for k in ("zero_shot_acc", "target_acc", "source_acc"):
            assert 0.0 <= r[k] <= 1.0
        assert r["n_depthwise_convs"] > 0  # MobileNetV2 is depthwise-separable
        # --few-shot 5 and --test-per-class 10 over digits' 10 classes
        assert (r["n_target_train"], r["n_target_test"], r["n_source_test"]) == (50, 100, 100)
        pre = PRESETS["default"].extra  # flags not given come from the preset
        assert (r["corruption"], r["severity"]) == (pre["corruption"], pre["severity"])
        assert r["env_torch_version"] and r["env_threads"] >= 1
    full, r1, r2 = ok
    # LoRA trains (and ships) far less than full FT; a larger rank ships more
    assert r1["trainable_params"] < r2["trainable_params"] < full["trainable_params"]
    assert r1["adapter_bytes"] < r2["adapter_bytes"] < full["adapter_bytes"]
    assert full["adapter_bytes"] >= 4 * full["trainable_params"]  # float32 weights + header
    assert full["memory_by_category_optimizer"] > r2["memory_by_category_optimizer"]
    # torch's counter charges depthwise weight gradients as dense: it over-counts full FT
    assert full["flops_torch"] > full["flops_forward"] + full["flops_backward"]
    # zero-shot is the same source model for every method of the group
    assert len({r["zero_shot_acc"] for r in ok}) == 1


def test_failing_configuration_is_recorded_and_sweep_goes_on(sweep):
    failed = [r for r in sweep["rows"] if r["model"] == "squeezenet1_0"]
    assert len(failed) == 3
    for r in failed:
        assert r["status"] == "failed"
        assert "too small" in r["error"]
    assert (sweep["out"] / "errors.log").read_text().count("squeezenet1_0") >= 3
    md = (sweep["out"] / "findings.md").read_text()
    assert "3 failed" in md


def test_plots_produced(sweep):
    plots = sweep["plots"]
    for stem in ("flops", "memory", "accuracy", "pareto"):
        for ext in ("png", "svg"):
            p = plots / f"{stem}_mobilenet_v2_digits_shift.{ext}"
            assert p.is_file() and p.stat().st_size > 1000, p
    assert (plots / "flop_counters.png").is_file()
    # regenerate from the CSV alone into a fresh folder
    fresh = sweep["out"] / "replot"
    assert plot_main([str(sweep["out"] / "results.csv"), "--plots", str(fresh),
                      "--formats", "png"]) == 0
    assert sorted(p.name for p in fresh.glob("*.png")) == sorted(
        p.name for p in plots.glob("*.png"))


def test_findings_are_computed_from_the_rows(sweep):
    md = (sweep["out"] / "findings.md").read_text()
    rows = load_results(sweep["out"])
    assert md.strip() == findings_markdown(rows, str(sweep["out"])).strip()
    full = next(r for r in rows if r["method"] == "full" and r["status"] == "ok")
    lora1 = next(r for r in rows if r["method"] == "lora" and r["rank"] == 1)
    # the memory claim is at the deployment size (--cost-at 2x64), the device peak predicted
    saving = 1 - lora1["cost_memory_peak"] / full["cost_memory_peak"]
    assert f"{100 * saving:.1f}%" in md
    assert "batch 2 x 64x64, cpu, predicted" in md
    assert "mobilenet_v2** (depthwise-separable)" in md


def test_resume_skips_finished_rows(sweep, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("CONVPEFT_CACHE", str(cache_dir))
    before = {r["key"]: r for r in load_results(sweep["out"])}
    n_lines = len(read_jsonl(sweep["out"] / "results.jsonl"))
    rc = rank_sweep.main([*TINY, "--out", str(sweep["out"]), "--no-plots"])
    assert rc == 0
    assert "(3 already done, 3 to run)" in capsys.readouterr().out
    after = {r["key"]: r for r in load_results(sweep["out"])}
    assert after.keys() == before.keys()
    for k, r in before.items():
        if r["status"] == "ok":  # untouched: same timestamp, same numbers
            assert after[k] == r
        else:  # failed rows are retried (and fail again) and replace the old row
            assert after[k]["finished_at"] >= r["finished_at"]
    assert len(read_jsonl(sweep["out"] / "results.jsonl")) == n_lines + 3
    assert len(load_results(sweep["out"] / "results.csv")) == 6


def test_seeds_resume_one_by_one_and_share_one_profile(tmp_path, capsys):
    """One row per (configuration, seed); a later seed copies the first seed's profile instead
    of profiling again, also when it runs in a later, resumed sweep; the summary CSV folds the
    seeds into one row per configuration."""
    out = tmp_path / "seeds"
    base = [*tiny("mobilenet_v2", "head,lora", "2"), "--profile-only", "--out", str(out),
            "--no-plots"]
    assert rank_sweep.main([*base, "--seeds", "1,"]) == 0
    first = {(r["method"], r["seed"]): r for r in load_results(out)}
    assert set(first) == {("head", 1), ("lora", 1)}
    assert rank_sweep.main([*base, "--seeds", "3"]) == 0
    assert "(2 already done, 4 to run)" in capsys.readouterr().out
    rows = load_results(out)
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    by = {(r["method"], r["seed"]): r for r in rows}
    for m in ("head", "lora"):
        assert by[(m, 1)] == first[(m, 1)]  # untouched by the resumed sweep
        for seed in (0, 2):  # profiled by seed 1's row in the earlier sweep, not again
            r = by[(m, seed)]
            assert r["profile_seed"] == 1 and r["status"] == "ok"
            for k in ("flops_total", "flops_torch", "memory_peak", "step_time_s",
                      "profile_time_s", "memory_by_category_activations", "trainable_params",
                      "adapter_bytes"):
                assert r[k] == first[(m, 1)][k], k
    with (out / "results_summary.csv").open(newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(s["method"], s["n_seeds"], s["seeds"]) for s in summary] == [
        ("head", "3", "0 1 2"), ("lora", "3", "0 1 2")]
    assert float(summary[1]["flops_total"]) == by[("lora", 0)]["flops_total"]


def test_profile_only_measures_cost_without_accuracy(tmp_path):
    out = tmp_path / "po"
    rc = rank_sweep.main(["--models", "resnet18", "--tasks", "new_classes", "--methods",
                          "head,dora", "--ranks", "2", "--resolution", "8", "--batch-size", "8",
                          "--profile-repeat", "1", "--profile-only", "--out", str(out),
                          "--no-plots", "--seeds", "1"])
    assert rc == 0
    rows = load_results(out)
    assert [r["method"] for r in rows] == ["head", "dora"]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["mode"] == "profile-only" and r["target_acc"] is None
        assert r["flops_total"] > 0 and r["memory_peak"] > 0
        assert r["n_depthwise_convs"] == 0  # ResNet18 has only standard convs
    # the standard net: both counters agree on forward + backward
    for r in rows:
        assert r["flops_torch"] == r["flops_forward"] + r["flops_backward"]


def test_interrupt_leaves_a_valid_file_and_rerun_resumes(tmp_path, cache_dir, sweep):
    """A real SIGINT (Ctrl-C) to a running sweep (profile-only: the same loop, faster)."""
    out = tmp_path / "int"
    args = [sys.executable, "-m", "benchmarks.rank_sweep",
            *tiny("mobilenet_v2", "lora", "1,2,3,4"), "--profile-only",
            "--out", str(out), "--no-plots"]
    env = {**os.environ, "CONVPEFT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    # started with SIGINT ignored, as a shell starts a background job: the sweep must install
    # its own handler, so the test does not depend on how pytest itself was launched
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    jsonl = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "rerun the same command to resume" in output
    rows = load_results(out / "results.csv")  # a complete, parseable table
    assert 1 <= len(rows) < 4 and all(r["status"] == "ok" for r in rows)
    for line in jsonl.read_text().splitlines():
        json.loads(line)
    done = len(rows)
    # resume: only the rest runs
    rc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    assert f"({done} already done, {4 - done} to run)" in rc.stdout
    assert len(load_results(out)) == 4


def test_notebook_executes(sweep, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("RANK_SWEEP_RESULTS", str(sweep["out"] / "results.jsonl"))
    monkeypatch.setenv("RANK_SWEEP_PLOTS", str(tmp_path / "nbplots"))
    nb = nbformat.read(REPO / "notebooks" / "rank_sweep.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = json.dumps([o.get("data", {}) for o in outputs]) + "".join(
        o.get("text", "") for o in outputs)
    assert "6 rows: 3 ok, 3 failed" in text
    assert "<table>" in text and "image/png" in text
    assert "Peak-memory saving" in text
    assert (tmp_path / "nbplots" / "pareto_mobilenet_v2_digits_shift.png").is_file()


def test_exit_status_when_every_configuration_fails(tmp_path, capsys):
    rc = rank_sweep.main(["--models", "squeezenet1_0", "--tasks", "shift", "--methods", "head",
                          "--resolution", "8", "--out", str(tmp_path), "--no-plots",
                          "--seeds", "1"])
    assert rc == 1
    assert "every configuration failed" in capsys.readouterr().err
    assert [r["status"] for r in load_results(tmp_path)] == ["failed"]


def test_replay_mixes_old_classes_into_new_class_adaptation():
    """--replay-per-class N adds N old-class images per class to the new_classes target split
    (and only there); 0 keeps the settings signature of runs made before the option existed."""
    args = ["--models", "mobilenet_v2", "--tasks", "new_classes,shift", "--methods", "full",
            "--resolution", "8", "--few-shot", "5"]
    plain = rank_sweep.plan_from_args(rank_sweep.build_parser().parse_args(args))
    replay = rank_sweep.plan_from_args(
        rank_sweep.build_parser().parse_args([*args, "--replay-per-class", "3"]))
    assert plain.settings.signature() != replay.settings.signature()
    cfg = Config("mobilenet_v2", "new_classes", "full", None, 0)
    t0 = rank_sweep.SourceCache(plain.settings).task(cfg)
    t3 = rank_sweep.SourceCache(replay.settings).task(cfg)
    k = t3.source_num_classes
    old0 = (t0.target_train.labels < k).sum().item()
    old3 = t3.target_train.labels[t3.target_train.labels < k]
    assert old0 == 0
    assert old3.bincount(minlength=k).tolist() == [3] * k
    shift = rank_sweep.SourceCache(replay.settings).task(Config("mobilenet_v2", "shift", "full",
                                                               None, 0))
    assert len(shift.target_train) == len(rank_sweep.SourceCache(plain.settings).task(
        Config("mobilenet_v2", "shift", "full", None, 0)).target_train)
    with pytest.raises(ValueError, match="--replay-per-class must be >= 0"):
        rank_sweep.plan_from_args(
            rank_sweep.build_parser().parse_args([*args, "--replay-per-class", "-1"]))


# ----------------------------------------------------------------------------- careless input


@pytest.mark.parametrize("bad", [
    ["--models", "mobilenet_v2,nope"],
    ["--formats", "png,bogus"],
])
def test_bad_grid_or_output_flags_exit_2_with_one_line(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rank_sweep.main([*bad, "--out", str(tmp_path / "o"), "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_sweep_figures_and_findings_stay_under_the_results_folder(tmp_path, monkeypatch):
    """The main job never writes the clone's tracked files (issue 26): the default sweep's
    figures and findings go under results/ (git-ignored); another --out draws into OUT/plots;
    only --plots names another folder."""
    from benchmarks.common import DEFAULT_OUT, default_plots_dir
    from benchmarks.sweep.cli import build_parser, plan_from_args

    monkeypatch.chdir(tmp_path)

    def plan_of(*argv: str):
        return plan_from_args(build_parser().parse_args([*argv, "--profile-only"]))

    default = plan_of()
    assert default.out == Path("results/rank_sweep") == Path(DEFAULT_OUT)
    assert default.plots == Path("results/rank_sweep/plots")
    # finish() writes findings.md into out and plots: both under results/
    for folder in (default.out, default.plots):
        assert folder.parts[0] == "results", folder
    assert plan_of("--out", DEFAULT_OUT + "/").plots == Path("results/rank_sweep/plots")
    assert plan_of("--out", "results/study").plots == Path("results/study/plots")
    assert plan_of("--preset", "study", "--out", "o").plots == Path("o/plots")
    assert plan_of("--out", "o", "--plots", "figs").plots == Path("figs")
    assert plan_of("--out", "o", "--no-plots").plots is None
    assert "OUT/plots" in build_parser().format_help()
    assert "--reference" in build_parser().format_help()
    # python -m benchmarks.plot RESULTS: RESULTS_FOLDER/plots; the committed CSV's figures
    # under results/ too, however plots/ is spelt
    assert default_plots_dir("results/rank_sweep/results.jsonl") == Path(
        "results/rank_sweep/plots")
    assert default_plots_dir("results/study/results.csv") == Path("results/study/plots")
    for ref in ("plots/rank_sweep_default.csv", "./plots", str(tmp_path / "plots")):
        assert default_plots_dir(ref) == Path("results/reference/plots"), ref


def test_plot_writes_plots_folder_only_with_reference(tmp_path, monkeypatch, capsys):
    """``python -m benchmarks.plot plots/rank_sweep_default.csv`` draws under results/;
    ``--reference`` is the one command that rewrites the committed plots/ (figures, findings,
    summary), from the committed CSV (a one-group slice of it here, to stay fast)."""
    import csv

    from benchmarks.plots import make as plot

    src = Path(__file__).resolve().parents[1] / "plots" / "rank_sweep_default.csv"
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["model"] == "resnet18" and r["task"] == "shift"]
        fields = reader.fieldnames
    assert rows
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plots").mkdir()
    with (tmp_path / "plots" / "rank_sweep_default.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    before = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plot.main(["plots/rank_sweep_default.csv", "--formats", "png"]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == before  # untouched
    assert (tmp_path / "results/reference/plots/pareto_resnet18_digits_shift.png").is_file()
    with pytest.raises(SystemExit):  # --reference takes no RESULTS
        plot.main(["plots/rank_sweep_default.csv", "--reference"])
    with pytest.raises(SystemExit):  # no RESULTS and no --reference
        plot.main([])
    assert plot.main(["--reference", "--formats", "png"]) == 0
    written = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"pareto_resnet18_digits_shift.png", "findings.md",
            "rank_sweep_default_summary.csv"} <= written
    assert "# Rank sweep findings" in (tmp_path / "plots" / "findings.md").read_text()


@pytest.mark.parametrize("flag", ["--out", "--plots"])
def test_file_shaped_output_folder_is_refused_before_running(flag, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for path in (f, f / "sub"):  # the file itself, or a folder under it
        with pytest.raises(SystemExit) as e:
            rank_sweep.main(["--models", "mobilenet_v2", flag, str(path)])
        assert e.value.code == 2
        assert_one_line_error(capsys, "is a file", str(f))
    assert f.read_text() == "x"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: a chmod 500 folder, or for root (who ignores
    permission bits) a read-only system folder; skips where neither exists."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ro
    for cand in (Path("/sys"), Path("/proc/sys")):
        try:
            (cand / ".convpeft-probe").touch()
        except OSError:
            return cand
        (cand / ".convpeft-probe").unlink()
    pytest.skip("no read-only folder for root here")


@pytest.mark.parametrize("flag", ["--out", "--plots"])
def test_read_only_output_folder_is_refused(flag, tmp_path, capsys):
    ro = _read_only_folder(tmp_path)
    try:
        with pytest.raises(SystemExit) as e:
            rank_sweep.main(["--models", "mobilenet_v2", flag, str(ro / "out")])
        assert e.value.code == 2
        assert_one_line_error(capsys, "not writable", str(ro))
    finally:
        if ro.is_relative_to(tmp_path):
            ro.chmod(0o700)
    assert not (ro / "out").exists()


def test_unwritable_pretrain_cache_is_refused_before_running(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("x")
    monkeypatch.setenv("CONVPEFT_CACHE", str(blocker))
    args = [*tiny("mobilenet_v2", "lora", "1"), "--out", str(tmp_path / "o"), "--no-plots"]
    with pytest.raises(SystemExit) as e:
        rank_sweep.main(args)
    assert e.value.code == 2
    assert_one_line_error(capsys, "pretrain cache", str(blocker), "$CONVPEFT_CACHE")
    assert not (tmp_path / "o").exists()
    # --profile-only pretrains nothing, so it does not need the cache
    assert rank_sweep.main([*args, "--profile-only"]) == 0


def test_unknown_model_exits_2_from_the_command_line(tmp_path):
    """The real process: ``--models good,nope`` must not exit 0 (nor print a traceback)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.rank_sweep", "--models",
                        "mobilenet_v2,nope", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "nope" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert not (tmp_path / "o").exists()


def test_csv_is_rebuilt_from_jsonl_on_a_rerun_with_nothing_to_run(sweep, tmp_path, cache_dir,
                                                                   monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sweep["out"], out)
    truth = load_results(out / "results.jsonl")
    monkeypatch.setenv("CONVPEFT_CACHE", str(cache_dir))
    args = [*TINY, "--models", "mobilenet_v2", "--out", str(out), "--no-plots"]
    for damage in ("truncate", "append", "delete"):
        csv_path = out / "results.csv"
        if damage == "truncate":
            csv_path.write_bytes(csv_path.read_bytes()[:200])
        elif damage == "append":
            with csv_path.open("a") as f:
                f.write("garbage,,,\n\x00\x01")
        else:
            csv_path.unlink()
        (out / "findings.md").write_text("stale")
        assert rank_sweep.main(args) == 0
        rebuilt = load_results(csv_path)
        assert [(r["key"], r["status"], r.get("flops_total")) for r in rebuilt] == [
            (r["key"], r["status"], r.get("flops_total")) for r in truth]
        assert "3 failed" in (out / "findings.md").read_text()  # every JSONL row, not the grid


def test_unreadable_jsonl_lines_are_skipped_one_by_one(tmp_path):
    st = ResultsStore(tmp_path)
    st.add({"key": "a", "status": "ok"})
    with (tmp_path / "results.jsonl").open("ab") as f:
        f.write(b'{"key": "\xff\xfe bad utf8", "status": "ok"}\n')
        f.write(b'[1, 2, 3]\n{"key": 7}\n"just a string"\n')
    st.add({"key": "b", "status": "ok"})
    with pytest.warns(UserWarning, match="skipped 4 unreadable line"):
        st2 = ResultsStore(tmp_path)
    assert st2.done_keys() == {"a", "b"}
    assert [r["key"] for r in load_results(tmp_path / "results.csv")] == ["a", "b"]


def test_odd_jsonl_rows_are_skipped_and_the_rerun_still_finishes(tmp_path, capsys):
    """A hand-edited or foreign results.jsonl: rows of the wrong shape are skipped with a
    warning naming the line and the reason, on every rerun, and never crash the findings."""
    args = [*tiny("mobilenet_v2", "full,lora", "1"), "--profile-only", "--out", str(tmp_path),
            "--no-plots"]
    assert rank_sweep.main(args) == 0
    with (tmp_path / "results.jsonl").open("ab") as f:
        f.write(b'{"key": "x", "status": "ok", "model": "resnet18", "task": "shift", '
                b'"method": "lora", "rank": "abc"}\n')
        f.write(b'{"key": "y", "status": "ok", "model": 5}\n')
        f.write(b'{"key": "z", "status": "ok", "flops_total": "big"}\n\xff\n')
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"skipped 4 unreadable line\(s\) \(line 3: 'rank' "
                          r"is 'abc', expected an integer; line 4: 'model' is 5"):
            assert rank_sweep.main(args) == 0
        assert "(2 already done, 0 to run)" in capsys.readouterr().out
        assert len(load_results(tmp_path / "results.csv")) == 2
        assert "2 configurations measured, 0 failed" in (tmp_path / "findings.md").read_text()


def _sweep_process(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.rank_sweep", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_sweeps_on_different_grids_into_one_folder_lose_no_rows(tmp_path):
    """Two real sweeps at once into one --out: every row of both grids ends up in the JSONL,
    the CSV and findings.md, whichever finishes last."""
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--profile-only", "--out", str(out), "--no-plots"]
    grids = [tiny("mobilenet_v2", "full,lora", "1,2,3"), tiny("resnet18", "lora,dora", "1,2")]
    procs = [_sweep_process([*g, *common], env) for g in grids]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    keys = {line.strip() for g in grids for line in subprocess.run(
        [sys.executable, "-m", "benchmarks.rank_sweep", *g, *common, "--dry-run"], cwd=REPO,
        env=env, capture_output=True, text=True, check=True).stdout.splitlines()
        if line.count("|") > 3}
    assert len(keys) == 8  # 4 + 4 configurations, no key shared
    assert {r["key"] for r in read_jsonl(out / "results.jsonl")} == keys
    assert {r["key"] for r in load_results(out / "results.csv")} == keys
    assert "8 configurations measured, 0 failed" in (out / "findings.md").read_text()


def _append_rows(out: str, tag: str, n: int) -> None:
    st = ResultsStore(out)
    for i in range(n):
        st.add({"key": f"{tag}{i}", "status": "ok", "payload": "x" * 2000})


def test_concurrent_writers_into_one_folder_lose_no_rows(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_rows, args=(str(tmp_path), tag, 25)) for tag in "pq"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    keys = {f"{t}{i}" for t in "pq" for i in range(25)}
    assert {r["key"] for r in read_jsonl(tmp_path / "results.jsonl")} == keys
    assert {r["key"] for r in load_results(tmp_path / "results.csv")} == keys


def test_galore_rows_say_which_weights_fell_back_to_adamw(tmp_path):
    rc = rank_sweep.main([*tiny("mobilenet_v2", "galore", "1,64"), "--profile-only",
                          "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    rows = {r["rank"]: r for r in load_results(tmp_path)}
    # MobileNetV2's 3x3 depthwise weights are (C, 9): rank 64 >= 9 leaves them plain AdamW
    assert rows[64]["galore_fallback_weights"] > rows[1]["galore_fallback_weights"] == 0
    assert rows[1]["galore_projected_weights"] > rows[64]["galore_projected_weights"]
    assert rows[1]["galore_plain_adamw"] is False
    assert "plain AdamW" in rank_sweep.summary_line(rows[64])
    assert "plain AdamW" not in rank_sweep.summary_line(rows[1])
    # a rank above every targeted weight's smaller side: the whole row is plain AdamW
    rc = rank_sweep.main([*tiny("mobilenet_v2", "galore", "100000"), "--profile-only",
                          "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    row = {r["rank"]: r for r in load_results(tmp_path)}[100000]
    assert row["galore_projected_weights"] == 0 and row["galore_plain_adamw"] is True
    assert "GaLore: all weights plain AdamW" in rank_sweep.summary_line(row)


def test_lean_sweep_same_flops_less_memory_recorded_in_rows(tmp_path):
    args = [*tiny("mobilenet_v2", "lora,lora-fa", "4"), "--profile-only", "--bn", "freeze",
            "--no-plots"]
    assert rank_sweep.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert rank_sweep.main([*args, "--lean", "--out", str(tmp_path / "lean")]) == 0
    plain = {r["method"]: r for r in load_results(tmp_path / "plain")}
    lean = {r["method"]: r for r in load_results(tmp_path / "lean")}
    for m in ("lora", "lora-fa"):
        assert plain[m]["lean"] is False and lean[m]["lean"] is True
        assert lean[m]["key"] != plain[m]["key"]  # a lean row never resumes a plain one
        assert lean[m]["flops_forward"] == plain[m]["flops_forward"]
        assert (lean[m]["memory_by_category_activations"]
                < plain[m]["memory_by_category_activations"])
    assert (lean["lora-fa"]["memory_by_category_activations"]
            < lean["lora"]["memory_by_category_activations"])
