"""The study's setup (issue 13, item 3): the ``study`` preset and ``--target``, findings.md's
"The study's claims, reproduced and corrected" section, and the headline benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.study_claims import flop_headline, memory_claim
from benchmarks.sweep import runner as rank_sweep
from benchmarks.sweep.cli import build_parser, plan_from_args
from benchmarks.sweep.findings import findings_markdown, flop_reductions
from benchmarks.sweep.grid import PRESETS, Config, SweepSettings
from benchmarks.sweep.results import read_jsonl
from benchmarks.sweep.study_findings import study_claims
from convpeft.models import TESTED_MODELS

# ----------------------------------------------------------------------------- preset, target


def test_study_preset_is_the_studys_cost_setup(tmp_path):
    plan = plan_from_args(build_parser().parse_args(
        ["--preset", "study", "--out", str(tmp_path / "o"), "--no-plots"]))
    s = plan.settings
    assert s.target == "standard" and s.profile_only and not s.small_input
    assert (s.batch_size, s.resolution) == (32, 224)
    pre = PRESETS["study"]
    assert set(pre.models) <= set(TESTED_MODELS) and pre.ranks == PRESETS["paper"].ranks
    n_ranked = sum(m in ("lora", "dora") for m in pre.methods)
    assert len(plan.configs) == len(pre.models) * (1 + n_ranked * len(pre.ranks))
    # --target overrides the preset; the key tells the two apart
    conv = plan_from_args(build_parser().parse_args(
        ["--preset", "study", "--target", "conv", "--out", str(tmp_path / "o"), "--no-plots"]))
    assert conv.settings.target == "conv"
    assert {c.key(s) for c in plan.configs}.isdisjoint({c.key(conv.settings)
                                                        for c in conv.configs})


def test_target_enters_the_key_only_when_not_every_conv():
    cfg = Config("mobilenet_v2", "shift", "lora", 4, 0)
    base = SweepSettings(dataset={"shift": "digits"})
    # "conv" is the former behaviour: keys of rows written before --target stay valid
    assert base.signature() == SweepSettings(dataset={"shift": "digits"},
                                             target="conv").signature()
    assert cfg.key(base) != cfg.key(SweepSettings(dataset={"shift": "digits"},
                                                  target="standard"))


def test_target_is_recorded_and_changes_what_is_adapted(tmp_path, one_thread):
    out = tmp_path / "o"
    args = ["--models", "mobilenet_v2", "--tasks", "shift", "--methods", "full,lora",
            "--ranks", "1", "--seeds", "1", "--resolution", "8", "--batch-size", "4",
            "--profile-only", "--profile-repeat", "1", "--out", str(out), "--no-plots"]
    assert rank_sweep.main([*args, "--target", "standard"]) == 0
    assert rank_sweep.main(args) == 0  # same folder, every conv: new rows, nothing reused
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    lora = {r["target"]: r for r in rows if r["method"] == "lora"}
    assert set(lora) == {"standard", "conv"}
    # depthwise adapters add parameters and their weight-gradient FLOPs
    assert lora["standard"]["trainable_params"] < lora["conv"]["trainable_params"]
    assert lora["standard"]["flops_total"] < lora["conv"]["flops_total"]
    md = (out / "findings.md").read_text()
    assert "The study's claims, reproduced and corrected" in md
    assert "--target conv --lean" in md and str(out) in md  # what is still missing


# ----------------------------------------------------------------------------- findings


def _row(method, target="conv", lean=False, rank=None, ours=(50, 50), torch=1000, peak=200,
         seed=0, model="mobilenet_v3_small"):
    return {"status": "ok", "model": model, "dataset": "digits", "task": "shift",
            "method": method, "rank": rank, "seed": seed, "target": target, "lean": lean,
            "checkpoint": False, "batch_size": 32, "resolution": 224, "small_input": False,
            "bn": "train", "flops_forward": ours[0], "flops_backward": ours[1],
            "flops_torch": torch, "memory_peak": peak * 2**20, "n_depthwise_convs": 9}


SYNTHETIC = [
    _row("full"), _row("full", lean=True, peak=199),
    # the study's: standard convs; torch's counter says 94%, ours 30%
    _row("lora", "standard", rank=1, ours=(40, 30), torch=60, peak=196),
    _row("lora", "standard", rank=1, ours=(40, 30), torch=60, peak=196, seed=1),
    _row("lora", "standard", rank=1, lean=True, ours=(40, 30), torch=60, peak=150),
    # ours: every conv; 25% counted correctly, 2% by torch's counter
    _row("lora", "conv", rank=1, ours=(40, 35), torch=980, peak=190),
]


def test_study_section_is_computed_from_the_rows():
    (rec,) = study_claims(SYNTHETIC)
    assert rec["flops_study"] == pytest.approx(0.94)
    assert rec["flops_correct"] == pytest.approx(0.30)
    assert rec["flops_conv"] == pytest.approx(0.25)
    assert rec["flops_conv_torch"] == pytest.approx(0.02)
    assert rec["mem_standard_plain"] == pytest.approx(0.02)
    assert rec["mem_standard_lean"] == pytest.approx(0.25)
    assert rec["mem_conv_plain"] == pytest.approx(0.05)
    assert rec["mem_conv_lean"] is None
    md = findings_markdown(SYNTHETIC, "results/study")
    section = md[md.index("The study's claims, reproduced and corrected"):]
    assert "94.0%" in section and "30.0%" in section and "25.0%" in section
    assert ("python -m benchmarks.rank_sweep --preset study --out results/study --models "
            "mobilenet_v3_small --methods full,lora --ranks 1 --target conv --lean") in section
    assert section.count("python -m benchmarks.rank_sweep") == 1  # only what is missing
    # the per-method sections keep adapters on every conv: nothing averaged across targets
    (fl,) = flop_reductions([r for r in SYNTHETIC if r["target"] == "conv" or
                             r["method"] == "full"])
    assert f"{100 * fl['ours_reduction']:.1f}% / {100 * fl['torch_reduction']:.1f}%" in md


def test_study_section_says_what_to_run_without_the_studys_rows():
    md = findings_markdown([r for r in SYNTHETIC if r["target"] == "conv"], "out/x")
    section = md[md.index("The study's claims, reproduced and corrected"):]
    assert "no LoRA/DoRA update with adapters on standard convs" in section
    assert "python -m benchmarks.rank_sweep --preset study --out out/x" in section
    assert "n/a" not in section


def test_default_runs_findings_send_the_study_to_its_own_folder():
    """The default grid's findings (batch 32 x 12x12) suggest the study's four sweeps into
    results/study, never into the default results folder they would mix with (issue 26)."""
    from benchmarks.common import REFERENCE_CSV
    from benchmarks.sweep.results import load_results

    rows = load_results(str(Path(__file__).resolve().parents[1] / REFERENCE_CSV))
    md = findings_markdown(rows, "results/rank_sweep")
    section = md[md.index("The study's claims, reproduced and corrected"):]
    cmds = [ln.strip() for ln in section.splitlines() if "benchmarks.rank_sweep" in ln]
    base = "python -m benchmarks.rank_sweep --preset study --out results/study"
    assert cmds == [base, base + " --target conv", base + " --lean",
                    base + " --target conv --lean"]
    assert "--out results/rank_sweep" not in section


# ----------------------------------------------------------------------------- headline


def test_headline_study_count_is_far_above_the_correct_one():
    h = flop_headline()  # MobileNetV3-small, LoRA r=1, batch 1 x 224x224, analytic
    study, correct = h["saving_torch_counter_standard"], h["saving_ours_standard"]
    assert 0.90 < study < 0.97  # the study's "up to 95%"
    assert 0.90 < h["saving_torch_rules_elementwise_standard"] < 0.97
    assert 0.2 < correct < 0.4 and study - correct > 0.5
    # adapters on every conv: torch's counter sees almost no saving, ours a similar one
    assert h["saving_torch_counter_conv"] < 0.1 and 0.15 < h["saving_ours_conv"] < 0.4


def test_memory_claim_saving_shrinks_with_the_batch():
    rows = memory_claim(["mobilenet_v3_small"], batches=(1, 32), resolution=224)
    s = {(r["batch"], r["config"]): r["saving"] for r in rows}
    assert s[(32, "LoRA")] < 0.1 < s[(1, "LoRA")]  # claim A at batch 32, not at batch 1
    assert s[(32, "LoRA, lean")] > s[(32, "LoRA")]
    assert s[(32, "LoRA, lean, BN frozen")] > s[(32, "LoRA, lean")]


def test_plots_draw_one_adapter_target(tmp_path, monkeypatch):
    """``python -m benchmarks.plot`` on a folder holding the study's rows draws the rows with
    adapters on every conv: no figure averages standard-conv and every-conv rows."""
    import benchmarks.plots.make as plot

    seen: list[dict] = []
    for name in ("plot_flops", "plot_memory", "plot_accuracy", "plot_pareto"):
        monkeypatch.setattr(plot, name, lambda grp, *a: seen.extend(grp))
    monkeypatch.setattr(plot, "plot_flop_counters", lambda rows: seen.extend(rows))
    assert plot.make_plots(SYNTHETIC, tmp_path) == []
    assert seen and {r["target"] for r in seen if r["method"] == "lora"} == {"conv"}
    seen.clear()
    standard_only = [r for r in SYNTHETIC if r["target"] == "standard" or r["method"] == "full"]
    plot.make_plots(standard_only, tmp_path)  # nothing else to draw: its own target is kept
    assert {r["target"] for r in seen if r["method"] == "lora"} == {"standard"}


def test_study_records_come_in_rank_order():
    rows = [_row("full")] + [_row("lora", "standard", rank=r) for r in (16, 2, 64, 1, 8)]
    assert [rec["rank"] for rec in study_claims(rows)] == [1, 2, 8, 16, 64]
