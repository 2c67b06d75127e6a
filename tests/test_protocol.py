"""The fine-tuning protocol (issue 33): schedule, validation split and held-out tests, the
learning rate chosen on validation, the shared source model, and the convergence check."""

from __future__ import annotations

import pytest
import torch

from benchmarks.sweep.convergence import compare_steps, convergence_markdown, doubled_settings
from benchmarks.sweep.grid import PRESETS, SweepSettings
from convpeft.data import build_task
from convpeft.methods import MethodConfig
from convpeft.models import build_model
from convpeft.train import finetune, select_lr
from convpeft.train.schedule import lr_multiplier, make_scheduler


@pytest.mark.parametrize("total", [10, 48, 97])
def test_cosine_warms_up_then_decays_to_almost_zero(total):
    m = [lr_multiplier(i, total, "cosine") for i in range(total)]
    n_warm = max(1, round(0.1 * total))
    assert all(a < b for a, b in zip(m[:n_warm], m[1:n_warm + 1], strict=False))
    peak = m.index(max(m))
    assert peak <= n_warm and max(m) <= 1.0
    assert all(a >= b for a, b in zip(m[peak:], m[peak + 1:], strict=False))
    assert 0 < m[-1] < 3 / total  # the last step still moves, barely
    assert all(lr_multiplier(i, total, "constant") == 1.0 for i in range(total))


def test_scheduler_steps_the_optimizer_rate_per_step_and_refuses_unknown_names():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.5)
    sched = make_scheduler(opt, 10, "cosine")
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_multiplier(i, 10, "cosine") for i in range(10)])
    assert make_scheduler(opt, 10, "constant") is None
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        make_scheduler(opt, 10, "linear")
    with pytest.raises(ValueError, match="warmup"):
        lr_multiplier(0, 10, "cosine", warmup=1.0)


def _ids(ds) -> set:
    """Identity of each image (its bytes): splits must not share an image."""
    return {hash(x.numpy().tobytes()) for x in ds.images}


def test_validation_and_test_splits_are_disjoint_and_new_classes_tests_on_every_unused_image():
    t = build_task("new_classes", "digits", resolution=8, few_shot=10, few_shot_seed=3,
                   val_per_class=5, test_unused=True)
    tr, va, te = _ids(t.target_train), _ids(t.target_val), _ids(t.target_test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert t.target_val.labels.bincount()[5:].tolist() == [5] * 5
    plain = build_task("new_classes", "digits", resolution=8, few_shot=10)
    # every target-class training image no split took joins the test split
    pool = len(build_task("new_classes", "digits", resolution=8).target_train)
    assert len(t.target_test) == len(plain.target_test) + pool - 10 * 5 - 5 * 5
    assert t.config()["few_shot_seed"] == 3 and t.config()["n_target_val"] == 25


def test_few_shot_seed_draws_another_sample_from_the_same_source_split():
    a = build_task("shift", "digits", resolution=8, few_shot=5, few_shot_seed=0,
                   corruption="contrast", severity=3, val_per_class=5)
    b = build_task("shift", "digits", resolution=8, few_shot=5, few_shot_seed=1,
                   corruption="contrast", severity=3, val_per_class=5)
    assert a.source_config() == b.source_config()  # the same source model serves both
    assert torch.equal(a.target_test.images, b.target_test.images)
    assert _ids(a.target_train) != _ids(b.target_train)


@pytest.mark.parametrize("kw, match", [
    ({"task": "shift", "few_shot": 5, "test_unused": True}, "test_unused is for"),
    ({"task": "new_classes", "val_per_class": 5}, "give few_shot"),
    ({"task": "new_classes", "few_shot": 100, "val_per_class": 100}, "lower val_per_class"),
    ({"task": "new_classes", "few_shot": 5, "val_per_class": -1}, ">= 0"),
])
def test_bad_split_requests_say_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        build_task(resolution=8, **kw)


@pytest.fixture(scope="module")
def val_task():
    return build_task("new_classes", "digits", resolution=8, few_shot=6, val_per_class=6)


def test_select_lr_chooses_by_validation_accuracy_and_leaves_the_model_alone(val_task):
    torch.manual_seed(0)
    model = build_model("resnet18", 5, small_input=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = select_lr(model, MethodConfig("head"), val_task, lrs=[1e-6, 3e-2], epochs=3,
                       batch_size=8, seed=0, device="cpu", progress=False, schedule="cosine")
    assert set(search.val_acc) == {1e-6, 3e-2}
    assert search.val_acc[search.lr] == max(search.val_acc.values())
    assert search.chosen.val_acc == search.val_acc[search.lr]
    assert search.chosen.lr == search.lr and search.chosen.schedule == "cosine"
    assert "*" in search.grid_text()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the chosen run is exactly what finetune gives at that rate (the sweep reuses it)
    again = finetune(model, MethodConfig("head"), val_task, lr=search.lr, epochs=3,
                     batch_size=8, seed=0, device="cpu", progress=False, schedule="cosine")
    assert again.target_acc == search.chosen.target_acc
    with pytest.raises(ValueError, match="val_per_class"):
        select_lr(model, "head", build_task("new_classes", "digits", resolution=8,
                                            few_shot=4), lrs=[1e-3])


def _rows(means: dict, sd: float = 0.01, n: int = 5, steps: int = 48,
          task: str = "shift") -> list[dict]:
    out = []
    for (method, rank), mean in means.items():
        for seed in range(n):
            out.append(dict(model="m", dataset="digits", task=task, method=method,
                            rank=rank, seed=seed, status="ok", steps=steps,
                            settings_signature=f"s{steps}",
                            target_acc=mean + sd * (seed - (n - 1) / 2)))
    return out


def test_convergence_check_flags_a_mean_that_leaves_its_interval():
    base = _rows({("full", None): 0.80, ("lora", 4): 0.70})
    twice = _rows({("full", None): 0.805, ("lora", 4): 0.78}, steps=96)
    recs = {r["method"]: r for r in compare_steps(base, twice)}
    assert recs["full"]["converged"] is True and recs["lora"]["converged"] is False
    assert recs["lora"]["shift"] == pytest.approx(0.08)
    assert recs["lora"]["steps"] == "48" and recs["lora"]["steps_x2"] == "96"
    md = convergence_markdown(list(recs.values()))
    assert "**1 of 2**" in md and "m shift lora r=4" in md and "+8.0" in md


def test_convergence_findings_name_each_tasks_step_counts():
    base = [*_rows({("full", None): 0.8}), *_rows({("full", None): 0.7}, steps=96,
                                                     task="new_classes")]
    twice = [*_rows({("full", None): 0.8}, steps=96),
             *_rows({("full", None): 0.7}, steps=192, task="new_classes")]
    md = convergence_markdown(compare_steps(base, twice))
    assert "96 instead of 48 for shift, 192 instead of 96 for new_classes" in md


def test_doubled_settings_double_steps_or_epochs_and_change_the_row_keys():
    s = SweepSettings(dataset={"shift": "digits"}, steps=48, schedule="cosine")
    assert doubled_settings(s).steps == 96 and doubled_settings(s).signature() != s.signature()
    e = SweepSettings(dataset={"shift": "digits"}, epochs=3)
    assert doubled_settings(e).epochs == 6


def test_finetune_takes_exactly_the_asked_steps_whatever_the_data_size(val_task):
    torch.manual_seed(0)
    model = build_model("resnet18", 5, small_input=True)
    kw = dict(batch_size=8, seed=0, device="cpu", progress=False, keep_model=False)
    # 30 training images at batch 8: 4 steps an epoch; 6 steps end inside the second epoch
    res = finetune(model, "head", val_task, steps=6, schedule="cosine", **kw)
    assert res.steps == 6 and res.epochs == 2
    with pytest.raises(ValueError, match="steps must be >= 1"):
        finetune(model, "head", val_task, steps=0, **kw)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_channels_last_training_matches_contiguous_and_auto_picks_it_for_depthwise_nets(
        val_task, method):
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 5, small_input=True)
    kw = dict(steps=4, batch_size=8, seed=0, device="cpu", progress=False, lr=1e-3)
    mcfg = MethodConfig(method, **({"rank": 2} if method != "full" else {}))
    plain = finetune(model, mcfg, val_task, **kw)
    cl = finetune(model, mcfg, val_task, memory_format="auto", **kw)
    assert (plain.memory_format, cl.memory_format) == ("contiguous", "channels_last")
    conv = next(m for m in cl.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the same training up to float rounding, which AdamW's first steps (about lr * sign(g)
    # per step) turn into at most ~2 lr per step apart where a gradient is near zero (the two
    # runs stepping opposite ways); and it trained (the optimizer holds the converted weights)
    src = {k: v for k, v in model.state_dict().items()}
    a, b = plain.model.state_dict(), cl.model.state_dict()
    trained = [k for k, p in cl.model.named_parameters() if p.requires_grad and k in src
               and src[k].shape == b[k].shape]
    assert trained and any(not torch.equal(src[k], b[k]) for k in trained)
    assert max((a[k] - b[k]).abs().max().item() for k in trained) <= 2 * 4 * 1e-3 * 1.01
    assert abs(plain.target_acc - cl.target_acc) <= 0.05


def test_memory_format_auto_keeps_nets_without_depthwise_contiguous_and_refuses_typos():
    from convpeft.train import resolve_memory_format

    r18 = build_model("resnet18", 5, small_input=True)
    assert resolve_memory_format(r18, "auto", "cpu") == "contiguous"
    mnv2 = build_model("mobilenet_v2", 5, small_input=True)
    assert resolve_memory_format(mnv2, "auto", "cuda") == "contiguous"
    assert resolve_memory_format(r18, "channels_last", "cpu") == "channels_last"
    with pytest.raises(ValueError, match="contiguous, channels_last, auto"):
        resolve_memory_format(r18, "nhwc", "cpu")


def test_protocol_off_keeps_the_old_row_keys():
    # rows written before the protocol existed keep their keys (resume, compare_runs)
    s = SweepSettings(dataset={"shift": "digits"})
    blob = s.signature()
    assert blob == SweepSettings(dataset={"shift": "digits"}, warmup=0.2).signature()
    assert blob != SweepSettings(dataset={"shift": "digits"}, steps=48).signature()


def test_steps_per_task_parse_double_and_key_the_rows():
    import argparse

    from benchmarks.sweep.cli import _steps

    assert _steps("48") == (48, {}) and _steps("48,new_classes=96") == (48, {"new_classes": 96})
    assert _steps("new_classes=96") == (None, {"new_classes": 96})
    for bad in ("48,60", "new_class=96", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="48,new_classes=96|like '48'"):
            _steps(bad)
    s = SweepSettings(dataset={"shift": "digits", "new_classes": "digits"}, steps=48,
                      task_steps={"new_classes": 96})
    assert (s.steps_for("shift"), s.steps_for("new_classes")) == (48, 96)
    d = doubled_settings(s)
    assert (d.steps_for("shift"), d.steps_for("new_classes")) == (96, 192)
    assert s.signature() != SweepSettings(dataset=s.dataset, steps=48).signature()
    assert PRESETS["default"].protocol["task_steps"] == {"new_classes": 96}


def test_presets_share_one_protocol_with_a_validation_split():
    for name in ("default", "budget"):
        p = PRESETS[name].protocol
        assert p["schedule"] == "cosine" and p["val_per_class"] > 0 and p["lr_grid"]
        assert p["source_seed"] == 0 and p["test_unused"]
        assert min(p["lr_grid"]) < 1.0 < max(p["lr_grid"])  # the default rate inside
    assert len(PRESETS["default"].seeds) == 5


SWEEP = ["--models", "resnet18", "--tasks", "new_classes", "--methods", "head,lora",
         "--ranks", "2,4", "--seeds", "2", "--resolution", "8", "--steps", "3,new_classes=4",
         "--pretrain-epochs", "0", "--few-shot", "4", "--val-per-class", "4",
         "--lr-grid", "1,3", "--batch-size", "8", "--profile-repeat", "1", "--device", "cpu",
         "--cost-at", "2x64", "--no-plots"]


@pytest.fixture(scope="module")
def protocol_sweeps(tmp_path_factory):
    """The protocol end to end: sequentially at one thread with the convergence check, and on
    two one-thread worker processes."""
    from benchmarks.sweep import runner
    from benchmarks.sweep.results import load_results

    root = tmp_path_factory.mktemp("protocol")
    mp = pytest.MonkeyPatch()
    mp.setenv("CONVPEFT_CACHE", str(root / "cache"))  # spawned workers inherit it
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert runner.main([*SWEEP, "--executor", "sequential", "--check-convergence",
                            "--out", str(root / "seq")]) == 0
        torch.set_num_threads(2)
        assert runner.main([*SWEEP, "--executor", "processes", "--workers", "2",
                            "--out", str(root / "proc")]) == 0
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return root, load_results(root / "seq"), load_results(root / "proc")


def test_sweep_tunes_each_method_once_and_trains_every_seed_and_rank_at_that_rate(
        protocol_sweeps):
    _, rows, _ = protocol_sweeps
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    for method in ("head", "lora"):
        mine = [r for r in rows if r["method"] == method]
        assert len({r["lr"] for r in mine}) == 1  # one rate for every seed and rank
        assert {r["lr_source"] for r in mine} == {"tuned"}
        grid = mine[0]["lr_grid_val"].split()
        assert len(grid) == 2 and sum(g.endswith("*") for g in grid) == 1
    lora = [r for r in rows if r["method"] == "lora"]
    assert {r["lr_tuned_on"] for r in lora} == {"seed 0, rank 2"}  # the middle of 2,4
    assert {int(r["steps"]) for r in rows} == {4} and {r["schedule"] for r in rows} == {"cosine"}
    assert {int(r["n_target_val"]) for r in rows} == {20}
    # one source model for both seeds, each seed its own few-shot sample
    assert len({r["source_weights_sha256"] for r in rows}) == 1


def test_worker_processes_give_the_sequential_rows(protocol_sweeps):
    from benchmarks.sweep.executor import TIMING_COLUMNS

    _, seq, proc = protocol_sweeps
    skip = TIMING_COLUMNS | {"source_cached"}
    a = {r["key"]: r for r in seq}
    b = {r["key"]: r for r in proc}
    assert a.keys() == b.keys()
    for k in a:
        diff = {c for c in a[k] if c not in skip and a[k][c] != b[k].get(c)}
        assert not diff, (k, {c: (a[k][c], b[k].get(c)) for c in diff})


def test_convergence_check_reruns_at_twice_the_steps_and_findings_report_it(protocol_sweeps):
    from benchmarks.sweep.convergence import read_records
    from benchmarks.sweep.results import load_results

    root, rows, _ = protocol_sweeps
    twice = load_results(root / "seq" / "steps_x2")
    assert {int(r["steps"]) for r in twice} == {8}
    # each method kept the rate the first run chose
    rate = {r["method"]: r["lr"] for r in rows}
    assert all(r["lr"] == rate[r["method"]] for r in twice)
    recs = read_records(root / "seq" / "convergence.csv")
    assert len(recs) == 3 and all(r["converged"] in (True, False) for r in recs)
    findings = (root / "seq" / "findings.md").read_text()
    assert "Convergence check" in findings and "twice the steps (8 instead of 4" in findings
    assert "The fine-tuning protocol" in findings


def test_process_executor_refuses_measured_costs(tmp_path, capsys):
    from benchmarks.sweep import runner

    with pytest.raises(SystemExit) as e:
        runner.main([*SWEEP, "--executor", "processes", "--measure-cost",
                     "--out", str(tmp_path / "o"), "--dry-run"])
    assert e.value.code == 2
    assert "--executor sequential" in capsys.readouterr().err


def test_update_time_measures_ratios_to_full_ft_in_one_run(tmp_path):
    import json

    from benchmarks import update_time

    out = tmp_path / "t.json"
    assert update_time.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["config"] for r in rows] == list(update_time.QUICK)
    assert rows[0]["time_vs_full"] == 1.0 and rows[0]["peak_vs_full"] == 1.0
    lean = rows[1]
    assert lean["time_vs_full"] == pytest.approx(lean["time_s"] / rows[0]["time_s"])
    assert lean["peak"] < rows[0]["peak"]  # LoRA lean holds less than full FT, measured
    assert data["machine"] and data["batch"] == 2 and data["resolution"] == 64
