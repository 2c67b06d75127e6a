"""The planner (convpeft.plan / convpeft.planner): budgets parse as documented, the batch search
is exact on any non-decreasing peak, and a planned batch really fits -- measured on CPU with
profile_update -- while the next batch does not (the plan is not needlessly conservative)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import convpeft
from convpeft.plan import main
from convpeft.planner import (
    PlanConfig,
    build_configured,
    expand_configs,
    format_plan,
    largest_fitting,
    parse_budget,
    plan,
)
from convpeft.profiler import profile_update

RES = 16


def tiny_cnn() -> nn.Module:
    """A depthwise-separable CNN small enough to plan and measure in well under a second."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def unpadded_cnn() -> nn.Module:
    """No padding: a 3x3 kernel cannot run on inputs smaller than 3x3."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(("text", "expected"), [
    ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("300M", 300_000_000),
    ("2GiB", 2 * 2**30), ("4096", 4096), (4096, 4096), ("512 mib", 512 * 2**20),
    ("300MB", 300_000_000), ("64Mi", 64 * 2**20), ("0.5KiB", 512), ("1e3", 1000),
    ("2k", 2000), ("1TB", 10**12), ("3 B", 3), ("0.1GB", 100_000_000),
])
def test_budget_units(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "cannot read budget"), ("lots", "cannot read budget"), ("-5MB", "cannot read budget"),
    ("1.5.5GB", "cannot read budget"), ("12XB", "unknown unit 'XB'"),
    ("5 Mbit", "unknown unit"), ("0", "at least 1 byte"), ("0.1", "at least 1 byte"),
    (True, "string or an int"), (1.5, "string or an int"),
])
def test_bad_budgets_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(text)


# ----------------------------------------------------------------------------- search
def _affine(a: int, b: int):
    return lambda n: a + b * n


PEAKS = {
    "affine": _affine(1000, 37),
    "optimizer-peak-then-affine": lambda n: max(5000, 1000 + 37 * n),  # flat, then linear
    "convex": lambda n: 100 + n * n,
    "concave": lambda n: 100 + int(400 * math.sqrt(n)),
    "steps": lambda n: 100 * (n // 7),  # plateaus of 7 batches
    "constant": lambda n: 500,
}


@pytest.mark.parametrize("name", sorted(PEAKS))
@pytest.mark.parametrize("budget", [1, 499, 500, 5000, 9999, 150_000])
@pytest.mark.parametrize("cap", [1, 100, 4096])
def test_search_is_exact_and_evaluates_each_batch_once(name, budget, cap):
    f = PEAKS[name]
    calls: list[int] = []

    def peak(n: int) -> int:
        calls.append(n)
        return f(n)

    best, seen = largest_fitting(peak, budget, cap)
    truth = max((n for n in range(1, cap + 1) if f(n) <= budget), default=0)
    assert best == truth
    assert len(calls) == len(set(calls)) == len(seen)
    assert seen == {n: f(n) for n in calls}
    if 0 < best < cap:
        assert seen[best] <= budget < seen[best + 1]  # the next batch was tried: not conservative
    assert len(calls) <= 2 * math.log2(cap) + 4


@pytest.mark.parametrize("budget", [1100, 5000, 50_000, 151_000])
def test_search_needs_four_evaluations_when_the_peak_is_affine(budget):
    best, seen = largest_fitting(_affine(1000, 37), budget, 4096)
    assert best == (budget - 1000) // 37 and len(seen) <= 4


def test_search_refuses_a_cap_below_one():
    with pytest.raises(ValueError, match="max_batch must be >= min_batch >= 1"):
        largest_fitting(_affine(1, 1), 10, 0)
    with pytest.raises(ValueError, match="max_batch must be >= min_batch >= 1"):
        largest_fitting(_affine(1, 1), 10, 4, min_batch=5)


# ----------------------------------------------------------------------------- plans, measured
def _measured(config: PlanConfig, batch: int, bn: str, optimizer: str):
    torch.manual_seed(0)
    model, opt = build_configured(tiny_cnn, config, bn=bn, optimizer=optimizer, device="cpu")
    x, y = torch.randn(batch, 3, RES, RES), torch.randint(0, 10, (batch,))
    return profile_update(model, opt, x, y, repeat=0, compare_torch=False)


@pytest.mark.parametrize(("method", "rank", "lean", "bn", "optimizer"), [
    ("full", None, False, "train", "adamw"),
    ("lora-fa", 2, True, "freeze", "sgdm"),
    ("dora", 2, True, "train", "adam"),
])
def test_planned_batch_fits_when_measured_and_the_next_one_does_not(method, rank, lean, bn,
                                                                   optimizer):
    budget = parse_budget("1MiB")
    (row,) = plan(tiny_cnn, "1MiB", resolution=RES, methods=[method], ranks=[rank or 1],
                  lean=lean, bn=bn, optimizer=optimizer)
    n = row.max_batch
    assert 1 < n < 4096 and not row.capped and row.fits and row.batch == n
    assert row.peaks[n] == row.memory_peak <= budget < row.peaks[n + 1]
    config = PlanConfig(method, rank, lean)
    measured = _measured(config, n, bn, optimizer)
    assert measured.memory_peak <= budget
    assert _measured(config, n + 1, bn, optimizer).memory_peak > 0.97 * budget
    # the row's other figures are the profile's at the planned batch
    assert row.flops_update == measured.flops_total
    assert row.flops_per_sample == round(measured.flops_total / n)
    assert row.trainable_params == measured.trainable_params <= row.total_params
    assert row.total_params == measured.total_params
    assert sum(row.memory_by_category.values()) == row.memory_peak
    assert row.headroom == budget - row.memory_peak


def test_budget_between_two_batches_plans_the_lower_one():
    (row,) = plan(tiny_cnn, 10**9, resolution=RES, methods=["lora"], ranks=[2], batch=9)
    (row10,) = plan(tiny_cnn, 10**9, resolution=RES, methods=["lora"], ranks=[2], batch=10)
    assert row.memory_peak < row10.memory_peak
    budget = (row.memory_peak + row10.memory_peak) // 2
    (planned,) = plan(tiny_cnn, budget, resolution=RES, methods=["lora"], ranks=[2])
    assert planned.max_batch == 9 and planned.memory_peak == row.memory_peak
    assert planned.memory_by_category == row.memory_by_category


@pytest.fixture(scope="module")
def planned_rows():
    return plan(tiny_cnn, "1.5MiB", resolution=RES, methods=["head", "lora"], ranks=[2, 8])


def test_rows_are_sorted_best_first_and_a_fixed_batch_agrees_with_the_search(planned_rows):
    rows = planned_rows
    assert [r.label for r in sorted(rows, key=lambda r: r.label)] == ["head", "lora r2", "lora r8"]
    assert [(-r.max_batch, r.memory_peak) for r in rows] == sorted(
        (-r.max_batch, r.memory_peak) for r in rows)
    best = {r.label: r.max_batch for r in rows}
    at = max(best.values())
    assert min(best.values()) < at  # the fixed batch fits some configurations, not all
    asked = plan(tiny_cnn, "1.5MiB", resolution=RES, methods=["head", "lora"], ranks=[2, 8],
                 batch=at)
    assert {r.label: r.fits for r in asked} == {k: v >= at for k, v in best.items()}
    assert [r.fits for r in asked] == sorted((r.fits for r in asked), reverse=True)
    assert all(r.max_batch is None and r.batch == at and r.evaluations == 1 for r in asked)
    table = format_plan(asked).splitlines()
    assert f"batch {at}" in table[0] and "fits" in table[1]
    rows = table[2:2 + len(asked)]  # notes follow the rows (e.g. op kinds never measured)
    assert [line.split()[-12] for line in rows] == ["yes" if r.fits else "no" for r in asked]


def test_plot_of_max_batch_against_rank(planned_rows, tmp_path):
    from convpeft.planner import plot_plan

    out = plot_plan(planned_rows, tmp_path / "plan.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_plan([], tmp_path / "empty.png")


def test_too_small_a_budget_plans_zero_and_a_cap_is_reported():
    (row,) = plan(tiny_cnn, "1KiB", resolution=RES, methods=["head"])
    assert row.max_batch == 0 and not row.fits and row.batch == 1 and row.memory_peak > 1024
    (big,) = plan(tiny_cnn, "1TB", resolution=RES, methods=["head"], max_batch=8)
    assert big.max_batch == 8 and big.capped and big.fits


def bn_on_pooled_cnn() -> nn.Module:
    """Train-mode BN on a 1x1 map: torch refuses batch 1 (one value per channel)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize(("budget", "max_batch"), [("1KiB", 0), ("1MiB", None)])
def test_search_starts_at_batch_2_where_batch_1_cannot_run(budget, max_batch):
    (row,) = plan(bn_on_pooled_cnn, budget, resolution=RES, methods=["full"])
    assert row.min_batch == 2 and 1 not in row.peaks
    if max_batch == 0:
        assert row.max_batch == 0 and row.batch == 2 and not row.fits
    else:
        assert row.max_batch > 2 and row.fits
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        plan(bn_on_pooled_cnn, budget, resolution=RES, methods=["full"], batch=1)


# ----------------------------------------------------------------------------- configurations
def test_default_configurations_are_every_method_incl_lora_fa():
    from convpeft.methods import get_method, list_methods

    configs = expand_configs()
    assert {c.method for c in configs} == set(list_methods()) >= {"lora-fa", "galore"}
    for c in configs:
        assert (c.rank is not None) == get_method(c.method).ranked and not c.lean
    assert {c.lean for c in expand_configs(["lora"], [4], "both")} == {False, True}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"methods": ["lorax"]}, "unknown method 'lorax'"),
    ({"methods": []}, "no method to plan"),
    ({"ranks": [0]}, "ranks must be integers >= 1"),
    ({"methods": ["lora"], "ranks": []}, "no rank given"),
    ({"lean": "sometimes"}, "lean must be"),
    ({"methods": ["galore"], "optimizer": "sgd"}, "galore brings its own"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ({"bn": "frozen"}, "bn must be one of"),
    ({"resolution": 0}, "resolution must be an integer >= 1"),
    ({"batch": 0}, "batch must be an integer >= 1"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
])
def test_bad_arguments_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(tiny_cnn, "1MiB", **{"resolution": RES, **kwargs})


def test_unknown_model_and_unusable_resolution_are_refused():
    with pytest.raises(ValueError, match="unknown model 'mobilenet_v9'"):
        plan("mobilenet_v9", "1GiB")
    with pytest.raises(ValueError, match="use a larger resolution"):
        plan(unpadded_cnn, "1GiB", resolution=2, methods=["full"])


def test_non_adamw_optimizer_leaves_galore_out_of_the_default_methods():
    from convpeft.methods import list_methods

    configs = expand_configs(ranks=[1], optimizer="sgd")
    assert {c.method for c in configs} == set(list_methods()) - {"galore"}
    with pytest.raises(ValueError, match="galore brings its own"):
        expand_configs(["lora", "galore"], [1], optimizer="sgd")


def test_optimizer_state_follows_the_optimizer():
    kw = {"resolution": RES, "batch": 2}
    (sgdm,) = plan(tiny_cnn, "1MiB", methods=["full"], optimizer="sgdm", **kw)
    (adamw,) = plan(tiny_cnn, "1MiB", methods=["full"], **kw)
    (galore,) = plan(tiny_cnn, "1MiB", methods=["galore"], ranks=[1], **kw)
    assert sgdm.optimizer == "sgdm" and sgdm.memory_by_category["optimizer"] > 0
    # AdamW: two moments per parameter and a 4-byte step counter per parameter tensor
    steps = 4 * len(list(tiny_cnn().parameters()))
    assert sgdm.memory_by_category["optimizer"] * 2 + steps == adamw.memory_by_category["optimizer"]
    # GaLore trains every parameter too, with rank-1 moments for the projected convs
    assert galore.trainable_params == adamw.trainable_params
    assert 0 < galore.memory_by_category["optimizer"] < adamw.memory_by_category["optimizer"]


def test_convpeft_plan_is_callable_however_it_was_imported():
    import convpeft.plan as plan_module

    assert convpeft.plan is plan_module and callable(convpeft.plan)
    assert convpeft.__getattr__("plan") is plan_module  # the lazy path of a fresh `import convpeft`
    with pytest.raises(AttributeError, match="no attribute 'planner_x'"):
        convpeft.__getattr__("planner_x")
    (row,) = convpeft.plan(tiny_cnn, "1MiB", resolution=RES, methods=["head"], batch=1)
    assert row.fits and isinstance(row, convpeft.PlanRow)


# ----------------------------------------------------------------------------- command line
def test_cli_json_rows(capsys):
    # (50 MB was enough at tensor level; the device needs 54.3 MB at any batch: oneDNN
    # reorders layer4's 9.4 MB conv weights into a blocked copy inside each forward)
    argv = ["--model", "resnet18", "--resolution", "32", "--budget", "60MB", "--methods",
            "head", "--json", "--quiet"]
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert (row["method"], row["rank"], row["lean"]) == ("head", None, False)
    assert {"max_batch", "memory_peak", "memory_by_category", "flops_per_sample",
            "trainable_params", "budget"} <= set(row)
    assert row["budget"] == 60_000_000 and row["max_batch"] > 1
    assert row["min_batch"] == 2  # 1x1 final map: train-mode BN cannot take batch 1
    assert row["memory_peak"] <= 60_000_000 < row["peaks"][str(row["max_batch"] + 1)]
    assert row["memory_by_category"]["scratch"] > 0 and row["device"] == "cpu"


def test_cli_table_says_when_nothing_fits(capsys):
    argv = ["--model", "resnet18", "--resolution", "32", "--budget", "1MB", "--methods", "head"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "does not fit even at the smallest batch" in captured.out and "head" in captured.out
    assert "[1/1] head: max batch 0" in captured.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget", "12XB"], "unknown unit 'XB'"),
    (["--budget", "1GiB", "--model", "nope"], "unknown model 'nope'"),
    (["--budget", "1GiB", "--methods", "lora,bogus"], "unknown method 'bogus'"),
    (["--budget", "1GiB", "--ranks", "0"], "ranks must be integers >= 1"),
    (["--budget", "1GiB", "--batch", "0"], "--batch must be >= 1"),
    (["--budget", "1GiB", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--budget", "1GiB", "--resolution", "-3"], "--resolution must be >= 1"),
    (["--budget", "1GiB", "--methods", "galore", "--optimizer", "sgd"], "galore brings its own"),
    (["--budget", "1GiB", "--plot", "x.png", "--batch", "4"], "cannot go with --batch"),
    (["--budget", "1GiB", "--plot", "x.docx"], "unknown figure format 'docx'"),
    (["--budget", "1GiB", "--plot", "/no/such/folder/x.png"], "does not exist"),
])
def test_cli_errors_are_one_line_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_profiler_overhead_refuses_cuda_without_a_gpu(capsys):
    from benchmarks.profiler_overhead import main as overhead_main

    with pytest.raises(SystemExit) as e:
        overhead_main(["--device", "cuda", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device is available" in err


# ----------------------------------------------------------------------------- sparse updates


def test_sparse_configurations_span_k_and_chunks_and_head_is_planned_once():
    cfgs = expand_configs(["lora", "head"], [4], lean=True, blocks=[None, 1, 2],
                          prefix_chunks=[1, 4])
    labels = [c.label for c in cfgs]
    assert labels == ["lora r4 lean", "lora r4 lean K1", "lora r4 lean K1 x4",
                      "lora r4 lean K2", "lora r4 lean K2 x4", "head lean"]
    for bad in ({"blocks": [-1]}, {"prefix_chunks": [0]}, {"blocks": [True]}):
        with pytest.raises(ValueError, match="blocks must be ints"):
            expand_configs(["lora"], [4], **bad)


def test_sparse_rows_fit_larger_batches_and_their_prediction_holds_when_measured():
    rows = plan("resnet18", "60MiB", resolution=32, methods=["lora"], ranks=[2], lean=True,
                blocks=[None, 1], prefix_chunks=[1, 4], max_batch=512)
    by = {r.label: r for r in rows}
    assert set(by) == {"lora r2 lean", "lora r2 lean K1", "lora r2 lean K1 x4"}
    # training the last block only builds no graph for the prefix: a larger batch fits; a
    # chunked prefix no longer holds the stem's output for the whole batch at once
    assert by["lora r2 lean K1"].max_batch > by["lora r2 lean"].max_batch
    assert by["lora r2 lean K1 x4"].max_batch >= by["lora r2 lean K1"].max_batch
    assert by["lora r2 lean K1"].trainable_params < by["lora r2 lean"].trainable_params
    row = by["lora r2 lean K1 x4"]
    assert (row.blocks, row.prefix_chunks) == (1, 4) and row.config.label == row.label
    # the plan's prediction against one real update at the planned batch: the tensor level
    # exact (up to the loss's scalars), the device peak (CPU allocator) within 3%
    net, opt = build_configured("resnet18", row.config, device="cpu")
    x = torch.randn(row.batch, 3, 32, 32)
    y = torch.randint(0, 10, (row.batch,))
    measured = profile_update(net, opt, x, y, repeat=0, compare_torch=False)
    assert abs(measured.memory_peak_tensors / row.memory_peak_tensors - 1) < 1e-3
    assert abs(measured.memory_peak / row.memory_peak - 1) < 0.03


def test_cli_blocks_flag(capsys):
    assert main(["--model", "resnet18", "--resolution", "32", "--budget", "60MiB",
                 "--methods", "lora", "--ranks", "2", "--lean", "--blocks", "all,1",
                 "--prefix-chunks", "2", "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["blocks"], r["prefix_chunks"]) for r in rows} == {(None, 1), (1, 2)}
    with pytest.raises(SystemExit):
        main(["--model", "resnet18", "--budget", "60MiB", "--blocks", "all,x"])
