"""The sweep's ``--update-blocks`` axis: grid, keys, columns, summary groups (profile-only)."""

from __future__ import annotations

import csv

import pytest

from benchmarks import rank_sweep
from benchmarks.sweep.grid import Config, SweepSettings, expand_grid, method_config
from benchmarks.sweep.results import load_results


def test_axis_expands_every_method_but_head_and_keeps_old_keys():
    grid = expand_grid(["m"], ["shift"], ["full", "head", "lora"], [1, 4], [0], [None, 0, 2])
    labels = [c.label for c in grid]
    assert labels == ["full", "full-K2", "head", "head-K0", "lora-r1", "lora-r1-K2", "lora-r4",
                      "lora-r4-K2"]
    assert expand_grid(["m"], ["shift"], ["lora"], [1], [0]) == [
        Config("m", "shift", "lora", 1, 0)]  # no axis: the default grid's configurations
    s = SweepSettings(dataset={"shift": "digits"})
    plain, sparse = Config("m", "shift", "lora", 4, 0), Config("m", "shift", "lora", 4, 0, 2)
    assert plain.key(s) == "m|digits|shift|lora|4|0|" + s.signature()  # as before the axis
    assert sparse.key(s) == plain.key(s) + "|K2"
    assert s.signature() == SweepSettings(dataset={"shift": "digits"}, prefix_chunks=1).signature()
    assert s.signature() != SweepSettings(dataset={"shift": "digits"}, prefix_chunks=4).signature()
    mc = method_config(sparse, SweepSettings(dataset={"shift": "digits"}, prefix_chunks=4))
    assert (mc.update_blocks, mc.prefix_chunks) == (2, 4)
    assert method_config(plain, s).update_blocks is None
    with pytest.raises(ValueError, match="update-blocks"):
        expand_grid(["m"], ["shift"], ["lora"], [1], [0], [-1])


@pytest.mark.parametrize("bad", ["x", "-1", ""])
def test_bad_axis_values_exit_2(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rank_sweep.main(["--update-blocks", bad, "--out", str(tmp_path), "--dry-run"])
    assert e.value.code == 2


def test_profile_only_sweep_records_the_axis_and_summarises_each_k(tmp_path):
    out = tmp_path / "sparse"
    rc = rank_sweep.main(["--models", "mobilenet_v2", "--tasks", "shift", "--methods",
                          "head,lora", "--ranks", "2", "--update-blocks", "all,0,3",
                          "--prefix-chunks", "2", "--resolution", "8", "--batch-size", "8",
                          "--profile-repeat", "1", "--profile-only", "--out", str(out),
                          "--no-plots", "--seeds", "1"])
    assert rc == 0
    rows = load_results(out)
    got = [(r["method"], r["update_blocks"], r["prefix_chunks"]) for r in rows]
    assert got == [("head", None, None), ("head", 0, 2), ("lora", None, None), ("lora", 3, 2)]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    by = {(r["method"], r["update_blocks"]): r for r in rows}
    # fewer trainable parameters and a lower peak when only the last 3 blocks train
    assert by[("lora", 3)]["trainable_params"] < by[("lora", None)]["trainable_params"]
    assert by[("lora", 3)]["memory_peak"] < by[("lora", None)]["memory_peak"]
    assert by[("head", 0)]["trainable_params"] == by[("head", None)]["trainable_params"]
    with (out / "results_summary.csv").open(newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(s["method"], s["update_blocks"]) for s in summary] == [
        ("head", ""), ("head", "0"), ("lora", ""), ("lora", "3")]


def test_findings_keep_sparse_rows_out_of_the_every_layer_comparisons():
    from benchmarks.sweep.findings import findings_markdown

    def row(method, k, peak, seed):
        return {"status": "ok", "model": "m", "dataset": "digits", "task": "shift",
                "method": method, "rank": "", "seed": seed, "update_blocks": k,
                "memory_peak": peak, "flops_total": 100.0, "flops_forward": 50.0,
                "flops_backward": 50.0, "target_acc": 0.5 + 0.01 * seed, "bn": "train",
                "batch_size": 8, "resolution": 8, "env_device": "cpu", "target": "conv"}

    rows = [row("full", None, 100.0 * 2**20, s) for s in range(3)]
    rows += [row("full", 2, 10.0 * 2**20, s) for s in range(3)]
    rows += [row("lora", None, 50.0 * 2**20, s) | {"rank": 4} for s in range(3)]
    md = findings_markdown(rows)
    # full FT's peak is its every-layer figure (100 MiB), not a mean with the sparse rows (55)
    assert "| m | shift | 100.0 |" in md and "55.0" not in md
    assert "configurations of their own" in md
    # the sparse rows are an accuracy configuration of their own, over their own 3 seeds
    assert "| m | shift | full FT, last 2 blocks |" in md
    assert "mean over 3 seed(s)" in md
