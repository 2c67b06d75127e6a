"""Every table and output block of the README and the docs that code produces, regenerated.

    python -m benchmarks.readme_figures --write    # rewrite the blocks in README.md and docs/
    python -m benchmarks.readme_figures --check    # exit 1, with a diff, if any block is stale

A generated block sits between two HTML comments (invisible on GitHub and in the docs site)::

    <!-- readme-figures: NAME -->
    ...what GENERATORS[NAME]() returns...
    <!-- /readme-figures -->

The markdown around the blocks is prose and stays hand-written; the numbers live in the blocks.
``tests/test_readme_figures.py`` runs ``--check``, so a change that moves a figure (a profiler
fix, a new default, a new reference run) fails the tests until this command is rerun with
``--write``. Every generator is deterministic and cheap: the plan and the memory tables are
analytic profiles (shapes on the meta device; device peaks predicted with the *shipped* CPU
scratch model, whatever this machine has calibrated), the device-truth table is read from the
committed ``plots/device_truth_cpu.json`` (``benchmarks.device_truth``; its generality matrix
from ``plots/device_truth_generality_cpu.json``), the default run's
figures are read from the committed ``plots/rank_sweep_default.csv``, and the ONNX op counts
come from one export. Measured times (the ONNX latency table, sweep durations) are not
generated: they say where and how they were measured instead.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import shlex
import statistics
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: README.md and docs/ are found from here, wherever the command runs."""
BLOCK = re.compile(r"(<!-- readme-figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /readme-figures -->)", re.S)

PLAN_ARGS = ("--model", "mobilenet_v2", "--resolution", "224", "--budget", "512MiB",
             "--methods", "full,lora-fa", "--ranks", "4", "--lean", "both")
"""The planner example of README.md and docs/planner.md (4 configurations, ~16 profiles)."""


@contextlib.contextmanager
def _shipped_scratch_model():
    """Point the calibration cache at an empty folder while generating, so that the predicted
    device peaks come from the shipped CPU scratch model, not this machine's calibration: the
    committed figures must regenerate identically everywhere."""
    old = os.environ.get("CONVPEFT_CACHE")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["CONVPEFT_CACHE"] = empty
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("CONVPEFT_CACHE", None)
            else:
                os.environ["CONVPEFT_CACHE"] = old


def documents(root: Path = ROOT) -> list[Path]:
    """The files that may hold generated blocks: the README and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@cache
def _reference_rows() -> tuple[dict, ...]:
    from benchmarks.common import REFERENCE_CSV
    from benchmarks.sweep.results import load_results

    return tuple(load_results(str(ROOT / REFERENCE_CSV)))


def plan_block() -> str:
    """The planner's command and what it prints (stdout; the progress lines go to stderr)."""
    from convpeft.plan import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(list(PLAN_ARGS))
    if rc:
        raise RuntimeError(f"python -m convpeft.plan {shlex.join(PLAN_ARGS)} exited {rc}")
    return (f"```bash\npython -m convpeft.plan {shlex.join(PLAN_ARGS)}\n```\n\n"
            f"```\n{out.getvalue().rstrip()}\n```\n")


def _wrap(lines: Sequence[str], width: int = 100) -> str:
    """Markdown lines wrapped at ``width`` (a bullet's continuation indented under its text)."""
    out: list[str] = []
    for line in lines:
        indent = "  " if line.startswith("- ") else ""
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                             break_on_hyphens=False) or [""]
    return "\n".join(out) + "\n"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _range(xs: Sequence[float]) -> str:
    return f"{_pct(min(xs))} to {_pct(max(xs))}"


def _by_model(recs: Sequence[dict], field: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in recs:
        if r.get(field) is not None:
            out.setdefault(r["model"], []).append(r[field])
    return out


def _ratios(xs: Sequence[float]) -> str:
    """Savings as the peak's ratio to full FT's, ``0.95x to 1.01x`` (a negative saving reads
    right)."""
    lo, hi = 1 - max(xs), 1 - min(xs)
    return f"{lo:.2f}x" if round(lo, 2) == round(hi, 2) else f"{lo:.2f}x to {hi:.2f}x"


def _default_run_lines() -> list[str]:
    """The reference run's memory and FLOP figures at its deployment size (predicted from
    shapes: the same on every machine), from its own rows."""
    from benchmarks.common import cost_where, primary_rows, uses_costs, variant_of
    from benchmarks.sweep.findings import flop_reductions, memory_savings, net_kind

    rows = [r for r in primary_rows(_reference_rows()) if variant_of(r) == "plain"]
    ok = [r for r in rows if r.get("status") == "ok"]
    mem = _by_model(memory_savings(rows), "saving")
    fl = flop_reductions(rows)
    ours, theirs = _by_model(fl, "ours_reduction"), _by_model(fl, "torch_reduction")
    over = _by_model(fl, "torch_overcount_full")
    setup = sorted({(r.get("batch_size"), r.get("resolution")) for r in ok}, key=str)
    trained = "; ".join(f"batch {b}, {s}x{s} inputs" for b, s in setup)
    where = cost_where(ok) if uses_costs(ok) else "the training size"
    lines = [f"From the committed reference run ([plots/findings.md](plots/findings.md); "
             f"trained at {trained}, BN in train mode, AdamW); every cost at the deployment "
             f"size, {where}:", ""]
    lines.append("- **Memory:** LoRA/DoRA's device peak is " + ", ".join(
        f"{_ratios(v)} full FT's on {m} ({net_kind(rows, m)})" for m, v in mem.items())
        + ": at this size the activations set the peak, and adapters keep them (lean "
        "activations, checkpointing and sparse updates remove them).")
    train = _by_model(fl, "train_ours_reduction")
    torch_txt = [f"{_range(theirs[m])} on {m} where ours says {_range(train[m])}" + (
        f" (it counts full FT at {statistics.mean(over[m]):.2f}x the true figure)"
        if round(statistics.mean(over[m]), 2) != 1 else "")
        for m in ours if m in theirs and m in over and m in train]
    lines.append("- **FLOPs:** counted correctly, LoRA/DoRA cut an update's FLOPs by "
                 + ", ".join(f"{_range(v)} on {m}" for m, v in ours.items())
                 + ("; at the training size, where torch's `FlopCounterMode` counts the same "
                    "updates, it says " + ", ".join(torch_txt) if torch_txt else "") + ".")
    return lines + _accuracy_lines(rows)


def _accuracy_lines(rows: Sequence[dict], protocol: str = "docs/rank-sweep.md#the-protocol",
                    findings: str = "plots/findings.md") -> list[str]:
    """How precise the reference run's accuracies are (half-width of the 95% interval per
    backbone) and what its convergence check found, from its rows and its convergence.csv."""
    from benchmarks.common import REFERENCE_CONVERGENCE_CSV
    from benchmarks.sweep.accuracy_findings import accuracy_intervals
    from benchmarks.sweep.convergence import read_records

    acc = [r for r in accuracy_intervals(rows) if r["target"].low is not None]
    if not acc:
        return []
    seeds = "/".join(map(str, sorted({r["target"].n for r in acc})))
    from benchmarks.sweep.accuracy_findings import per_task

    steps = per_task(rows, "steps")
    parts = []
    for m in dict.fromkeys(r["model"] for r in acc):
        hw = [100 * r["target"].half_width for r in acc if r["model"] == m]
        parts.append(f"median {statistics.median(hw):.1f} points on {m} (largest {max(hw):.1f})")
    text = (f"- **Accuracy:** {seeds} seeds, every configuration trained by "
            f"[the protocol]({protocol}) ({steps} steps, warm-up + cosine, "
            "each method at the rate its validation accuracy chose, every held-out image "
            "tested): the 95% intervals' half-width is " + ", ".join(parts))
    conv = ROOT / REFERENCE_CONVERGENCE_CSV
    if conv.is_file():
        recs = [r for r in read_records(conv) if r["converged"] is not None]
        text += (f"; with twice the steps, {sum(r['converged'] for r in recs)} of {len(recs)} "
                 "means stay inside their interval")
    return [text + f"; [plots/findings.md]({findings}) ranks two configurations only "
            "where the seeds separate them."]


def default_run_block() -> str:
    """The README's summary of the committed reference run: memory and FLOPs."""
    return _wrap(_default_run_lines())


def default_run_details_block() -> str:
    """docs/rank-sweep.md's figures of the reference run: memory with the activations' share,
    FLOPs, and how wide the accuracy intervals are."""
    from benchmarks.common import primary_rows, variant_of
    from benchmarks.sweep.findings import activation_reason, memory_savings

    rows = [r for r in primary_rows(_reference_rows()) if variant_of(r) == "plain"]
    mem = memory_savings(rows)
    acc_lines = _accuracy_lines(rows, "#the-protocol")
    lines = _default_run_lines()[:-len(acc_lines) or None]
    for m in dict.fromkeys(r["model"] for r in mem):
        share = statistics.mean(r["full_activation_share"] for r in mem if r["model"] == m)
        lines.append(f"- **{m}:** activations saved for backward are {_pct(share)} of full "
                     f"FT's peak{activation_reason(mem, m)}.")
    return _wrap([*lines, *acc_lines])


def study_flops_block() -> str:
    """docs/study.md's table: the study's FLOP saving counted three ways."""
    from benchmarks.study_claims import OUR_TARGET, STUDY_TARGET, flop_headline

    h = flop_headline()
    lines = ["| saving vs full FT, counted as | adapters on standard convs (the study's) | "
             "on every conv (ours) |", "|---|---:|---:|"]
    for name, label in (("torch_counter", "torch's `FlopCounterMode` (the study's counter)"),
                        ("torch_rules_elementwise", "torch's conv rules + elementwise work"),
                        ("ours", "correctly (depthwise convs as they run)")):
        lines.append(f"| {label} | {_pct(h[f'saving_{name}_{STUDY_TARGET}'])} | "
                     f"{_pct(h[f'saving_{name}_{OUR_TARGET}'])} |")
    return "\n".join(lines) + "\n"


def onnx_ops_block() -> str:
    """docs/deploy.md's example, with the Conv counts of the merged and unmerged exports."""
    import torch
    import torchvision

    from convpeft import apply_adapters, export_onnx, onnx_op_counts

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    apply_adapters(model, "lora", rank=8, target="conv", trainable=["classifier"])
    with tempfile.TemporaryDirectory() as d:
        x = torch.randn(1, 3, 224, 224)
        merged = onnx_op_counts(export_onnx(model, os.path.join(d, "m.onnx"), x))["Conv"]
        unmerged = onnx_op_counts(export_onnx(model, os.path.join(d, "u.onnx"), x,
                                              merge=False))["Conv"]
    extra = (unmerged - merged) // 2
    return f'''```python
import torch, torchvision
from convpeft import apply_adapters, export_onnx, onnx_op_counts

model = torchvision.models.mobilenet_v2(num_classes=10)
apply_adapters(model, "lora", rank=8, target="conv", trainable=["classifier"])
# ... train ...
path = export_onnx(model, "mobilenet_v2_lora.onnx", torch.randn(1, 3, 224, 224))
print(path, onnx_op_counts(path)["Conv"])       # mobilenet_v2_lora.onnx {merged}: the base's count
unmerged = export_onnx(model, "unmerged.onnx", torch.randn(1, 3, 224, 224), merge=False)
print(onnx_op_counts(unmerged)["Conv"])         # {unmerged}: {extra} layers in activation space
```
'''


def lean_memory_block() -> str:
    """docs/memory.md's table: device peak of one AdamW update at batch 64 x 224x224 per method
    and lean/checkpoint option (predicted for the CPU with the shipped scratch model;
    ``python -m benchmarks.lean_memory``)."""
    from benchmarks.lean_memory import run

    rows = run(["mobilenet_v2", "resnet18"], 64, 224, 8, False)
    cols = [("full FT", "full FT, BN train (baseline)"), ("LoRA", "LoRA"),
            ("LoRA, lean", "LoRA, lean"), ("LoRA, ckpt", "LoRA, lean + ckpt"),
            ("LoRA-FA, lean", "LoRA-FA, lean"), ("LoRA-FA, ckpt", "LoRA-FA, lean + ckpt"),
            ("DoRA, lean", "DoRA, lean"), ("DoRA, ckpt", "DoRA, lean + ckpt")]
    names = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18"}
    lines = ["| | " + " | ".join(c for c, _ in cols) + " | floor (LoRA) |",
             "|---" * (len(cols) + 2) + "|"]
    for model, name in names.items():
        by = {r["config"]: r for r in rows if r["model"] == model}
        missing = [cfg for _, cfg in cols if cfg not in by]
        if missing:
            raise KeyError(f"benchmarks.lean_memory has no rows {missing} for {model}: update "
                           "lean_memory_block's columns to its CONFIGS")
        full = by[cols[0][1]]["peak_mib"]
        cells = [f"{full:.0f} MiB"]
        cells += [f"{by[cfg]['peak_mib']:.0f} ({by[cfg]['ratio']:.2f}x)" for _, cfg in cols[1:]]
        floor = by["LoRA"]["floor_mib"]
        cells.append(f"{floor:.0f} ({floor / full:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DEVICE_TRUTH_JSON = "plots/device_truth_cpu.json"
"""The committed device-truth run the docs quote (``benchmarks.device_truth --json``)."""
_TARGETS = {("mobilenet_v2", "lora", "lean"): 0.36, ("mobilenet_v2", "lora-fa", "lean"): 0.25,
            ("mobilenet_v2", "lora", "lean+ckpt"): 0.20, ("resnet18", "lora", "lean"): 0.42,
            ("resnet18", "lora-fa", "lean"): 0.36}


def device_truth_block() -> str:
    """docs/memory.md's measured table: per configuration the tensor-level, predicted and
    measured device peak, the prediction's error and the measured ratio to full FT, with the
    device-truth issue's targets, from the committed :data:`DEVICE_TRUTH_JSON`."""
    import json

    data = json.loads((ROOT / DEVICE_TRUTH_JSON).read_text())
    rows = data["rows"]
    names = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18"}
    lines = ["| model | configuration | tensors | predicted | measured | error | vs full FT "
             "(measured) | target | op at the peak |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        target = _TARGETS.get((r["model"], r["method"], r["variant"]))
        vs = r["vs_full"]
        mark = "" if target is None else (f"<= {target:.2f}: " +
                                          ("met" if vs <= target else "**not met**"))
        lines.append(f"| {names.get(r['model'], r['model'])} | {r['method']} {r['variant']} "
                     f"| {r['tensors'] / 2**20:.0f} | {r['predicted'] / 2**20:.0f} "
                     f"| {r['measured'] / 2**20:.0f} | {r['error']:+.1%} | {vs:.3f} | {mark} "
                     f"| {r['predicted_op'] or '(between ops)'} |")
    s = data["summary"]
    lines.append("")
    lines.append(f"MiB, batch {rows[0]['batch']} x {rows[0]['resolution']}x"
                 f"{rows[0]['resolution']}; {s['within_3pct']} of {s['rows']} predictions within "
                 f"3% of the measured peak (largest error {s['max_abs_error']:.2%}); "
                 f"{rows[0]['memory_model']}.")
    return "\n".join(lines) + "\n"


DEVICE_TRUTH_GENERALITY_JSON = "plots/device_truth_generality_cpu.json"
"""The committed generality matrix (``benchmarks.device_truth --generality --json``)."""


def device_truth_generality_block() -> str:
    """docs/memory.md's generality table: per (model, configuration) of the matrix the predicted
    and measured device peak and the error, with the op kinds the scratch model never measured,
    from the committed :data:`DEVICE_TRUTH_GENERALITY_JSON`."""
    import json

    data = json.loads((ROOT / DEVICE_TRUTH_GENERALITY_JSON).read_text())
    rows = data["rows"]
    lines = ["| model | configuration | tensors | predicted | measured | error | vs full FT "
             "(measured) | op kinds never measured (planned with the margin) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} {r['variant']} "
                     f"| {r['tensors'] / 2**20:.1f} | {r['predicted'] / 2**20:.1f} "
                     f"| {r['measured'] / 2**20:.1f} | {r['error']:+.1%} | {r['vs_full']:.3f} "
                     f"| {', '.join(r['unmeasured_ops']) or '-'} |")
    s = data["summary"]
    lines.append("")
    lines.append(f"MiB, batch {rows[0]['batch']} x {rows[0]['resolution']}x"
                 f"{rows[0]['resolution']}; {s['within_3pct']} of {s['rows']} predictions within "
                 f"3% of the measured peak (largest error {s['max_abs_error']:.2%}, median "
                 f"{s['median_abs_error']:.2%}); {rows[0]['memory_model']}.")
    for k in data.get("skipped", []):
        lines.append("")
        lines.append(f"Not run: {k['model']} {k['method']} {k['variant']} ({k['reason']}).")
    return "\n".join(lines) + "\n"


PLANNER_TRUTH_JSON = "plots/planner_truth_cpu.json"
"""The committed planner check (``benchmarks.planner_truth --json``)."""


def planner_truth_block() -> str:
    """docs/planner.md's check of plans against the device: per (model, configuration) the
    budget, the planned batch and its measured peak, and the largest batch measured to fit,
    from the committed :data:`PLANNER_TRUTH_JSON`."""
    import json

    data = json.loads((ROOT / PLANNER_TRUTH_JSON).read_text())
    rows, s = data["rows"], data["summary"]
    lines = ["| model | configuration | budget | planned batch | its measured peak | largest "
             "batch that fits | reach |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['budget'] / 2**20:.1f} "
                     f"| {r['planned']} | {r['measured'] / 2**20:.1f} "
                     f"{'(fits)' if r['fits'] else '(over)'} | {r['largest']} "
                     f"| {r['reach']:.3f} |")
    lines += ["", f"MiB, {rows[0]['resolution']}x{rows[0]['resolution']} on the CPU; the budget "
              "sits half an image's predicted step above the predicted peak at batch "
              f"{data['target']}; {s['fit']} of {s['rows']} planned batches fit when measured "
              f"(CPU allocator), {s['reach_ge_95pct']} reach at least 95% of the largest batch "
              f"that fits (lowest {s['min_reach']:.3f}); {rows[0]['memory_model']}."]
    return "\n".join(lines) + "\n"


SPARSE_MEMORY_JSON = "plots/sparse_memory_cpu.json"
"""The committed sparse-update memory run docs/sparse.md quotes (``benchmarks.sparse_memory
--json``)."""
_SPARSE_NAMES = {
    "full (BN train)": "full FT, BN train (baseline)",
    "lora lean+ckpt (every layer)": "LoRA every conv, lean + ckpt, BN train (every layer)",
    "head K=0 chunks=8": "head only, backbone in 8 chunks",
}


def _sparse_name(label: str) -> str:
    """``lora K=4 chunks=8`` -> ``LoRA last 4, prefix in 8 chunks``."""
    if label in _SPARSE_NAMES:
        return _SPARSE_NAMES[label]
    from benchmarks.common import blocks_label
    from convpeft.methods import get_method

    parts = label.split()
    ckpt = parts[-1] == "ckpt"
    parts = parts[:-1] if ckpt else parts
    name = get_method(parts[0]).label
    k = parts[1].removeprefix("K=")
    chunks = parts[2].removeprefix("chunks=") if len(parts) > 2 else None
    return (f"{name}{blocks_label(k)}" + (f", prefix in {chunks} chunks" if chunks else "")
            + (", blocks checkpointed" if ckpt else ""))


def sparse_memory_block() -> str:
    """docs/sparse.md's table: device peak (CPU allocator), ratio to full FT, tensor-level and
    predicted device peak per sparse configuration, from :data:`SPARSE_MEMORY_JSON`."""
    import json

    data = json.loads((ROOT / SPARSE_MEMORY_JSON).read_text())
    names = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18"}
    lines = ["| model | configuration | trainable params | device peak | x full FT | tensors "
             "| predicted (error) |", "|---|---|---:|---:|---:|---:|---:|"]
    prev = None
    for r in data["rows"]:
        model = names.get(r["model"], r["model"]) if r["model"] != prev else ""
        prev = r["model"]
        unit = " MiB" if model else ""
        lines.append(f"| {model} | {_sparse_name(r['config'])} | {r['trainable_params']:,} "
                     f"| {r['allocator_peak'] / 2**20:.0f}{unit} | {r['ratio']:.3f} "
                     f"| {r['tensor_peak'] / 2**20:.0f} | {r['analytic_peak'] / 2**20:.0f} "
                     f"({r['analytic_error']:+.1%}) |")
    within = sum(abs(r["analytic_error"]) <= 0.03 for r in data["rows"])
    lines.append("")
    lines.append(f"MiB, batch {data['batch']} x {data['resolution']}x{data['resolution']}; "
                 f"{within} of {len(data['rows'])} predictions within 3% of the measured peak "
                 f"(largest error {max(abs(r['analytic_error']) for r in data['rows']):.1%}).")
    return "\n".join(lines) + "\n"


BUDGET_CSV = "plots/rank_sweep_budget.csv"
"""The committed ``--preset budget`` run (``python -m benchmarks.rank_sweep --preset budget``)."""


def _budget_cell(acc: dict, refs: Sequence[dict | None]) -> str:
    """``mean [low, high]`` of the target accuracy (%), then per reference the paired
    difference to it (mean, ``=`` where the seeds do not separate them, ``+``/``-`` where they
    do; blank for the reference itself)."""
    from benchmarks.sweep.stats import compare_paired, metric_interval, paired_interval

    iv = metric_interval(list(acc.values()), "target_acc")
    diffs = []
    for ref in refs:
        if ref is None or ref is acc:
            diffs.append("")
            continue
        d = paired_interval(acc, ref)
        mark = {1: "+", -1: "-", 0: "="}.get(compare_paired(d), "?")
        diffs.append(f"{100 * d.mean:+.1f} {mark}")
    return f"{100 * iv.mean:.1f} [{100 * iv.low:.1f}, {100 * iv.high:.1f}]; " + " / ".join(diffs)


def budget_block() -> str:
    """README's "Fine-tuning under a memory budget", all from the committed budget run's own
    rows (:data:`BUDGET_CSV`): per model and configuration, its device peak at the run's
    deployment size over full FT's (``cost_memory_peak``: each configuration as the run
    trains it) and the target accuracy per task, with the paired differences to LoRA on every
    layer and to head only."""
    import csv
    from collections import defaultdict

    from benchmarks.common import blocks_label, blocks_of, cost_where, num
    from convpeft.methods import get_method

    with (ROOT / BUDGET_CSV).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status", "ok") == "ok"]
    peaks: dict = defaultdict(list)  # (model, method, K) -> device peaks (one per row)
    for r in rows:
        if num(r.get("cost_memory_peak")) is not None:
            peaks[(r["model"], r["method"], blocks_of(r))].append(num(r["cost_memory_peak"]))
    ratio = {}
    for (model, m, k), v in peaks.items():
        full = peaks.get((model, "full", None))
        if full:
            ratio[(model, m, k)] = statistics.mean(v) / statistics.mean(full)
    acc: dict = defaultdict(dict)  # (model, task, method, K) -> {seed: acc}
    for r in rows:
        acc[(r["model"], r["task"], r["method"], blocks_of(r))][int(r["seed"])] = float(
            r["target_acc"])
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18"}
    head = "| model | configuration | device peak x full FT | " + " | ".join(
        f"{t}: accuracy % [95%]; vs LoRA every layer / vs head only" for t in tasks) + " |"
    lines = [head, "|---|---|---:|" + "---|" * len(tasks)]
    for model in dict.fromkeys(r["model"] for r in rows):
        keys = sorted({(m, k) for (mm, _, m, k) in acc if mm == model},
                      key=lambda mk: (mk[0] != "head", mk[0] != "lora", mk[0],
                                      -(mk[1] if mk[1] is not None else 99)))
        first = True
        for m, k in keys:
            label = get_method(m).label + (" every layer" if k is None and m != "head"
                                           else blocks_label(k))
            x = ratio.get((model, m, k))
            cells = [_budget_cell(acc[(model, t, m, k)], [acc.get((model, t, "lora", None)),
                                                          acc.get((model, t, "head", None))])
                     if (model, t, m, k) in acc else "" for t in tasks]
            lines.append(f"| {names.get(model, model) if first else ''} | {label} | "
                         f"{'' if x is None else f'{x:.3f}'} | " + " | ".join(cells) + " |")
            first = False
    seeds = sorted({int(r["seed"]) for r in rows})
    costed = [r for r in rows if num(r.get("cost_memory_peak")) is not None]
    lines.append("")
    lines.append(f"{len(seeds)} seeds; `=`: the paired 95% interval of the difference contains "
                 "0, `+`/`-`: above/below it; device peak: "
                 + (cost_where(costed) if costed else "not in the rows")
                 + ", each configuration as the run trains it (LoRA r=4, BN train, frozen "
                 "prefix in 8 chunks); accuracy: the default tasks (`--preset budget`), "
                 f"{rows[0]['env_cpu']}.")
    return "\n".join(lines) + "\n"


LORA_FA_CSV = "plots/rank_sweep_lora_fa.csv"
"""The committed LoRA vs LoRA-FA run (``python -m benchmarks.rank_sweep --methods lora,lora-fa
--ranks 1,4,16 --seeds 10``)."""


def lora_fa_block() -> str:
    """docs/memory.md's "LoRA-FA's accuracy": LoRA and LoRA-FA's mean target accuracy per net,
    task and rank in the committed run (:data:`LORA_FA_CSV`) and the paired difference
    LoRA-FA minus LoRA with its 95% interval, plus the machine that measured it."""
    import csv
    from collections import defaultdict

    from benchmarks.sweep.stats import metric_interval, paired_interval

    with (ROOT / LORA_FA_CSV).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status", "ok") == "ok"]
    acc: dict = defaultdict(dict)  # (model, task, method, rank) -> {seed: acc}
    for r in rows:
        acc[(r["model"], r["task"], r["method"], int(r["rank"]))][int(r["seed"])] = float(
            r["target_acc"])
    ranks = sorted({k[3] for k in acc})
    names = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18"}
    lines = ["| | " + " | ".join(f"r={r}" for r in ranks) + " |",
             "|---|" + "---|" * len(ranks)]
    worst = None
    for model in dict.fromkeys(r["model"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows):
            cells = []
            for rank in ranks:
                lo, fa = acc[(model, task, "lora", rank)], acc[(model, task, "lora-fa", rank)]
                d = paired_interval(fa, lo)
                worst = d if worst is None or d.mean < worst.mean else worst
                cells.append(
                    f"{100 * metric_interval(list(lo.values()), 'target_acc').mean:.1f} / "
                    f"{100 * metric_interval(list(fa.values()), 'target_acc').mean:.1f}; "
                    f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]")
            lines.append(f"| {names.get(model, model)} {task.replace('_', ' ')} | "
                         + " | ".join(cells) + " |")
    seeds = sorted({int(r["seed"]) for r in rows})
    r0 = rows[0]
    lines.append("")
    lines.append(
        f"Target accuracy %, LoRA / LoRA-FA; LoRA-FA minus LoRA in points, mean [paired 95% "
        f"interval] over {len(seeds)} seeds; lowest mean {100 * worst.mean:+.1f}. Measured on "
        f"one machine: {r0['env_cpu']}, {r0['env_threads']} threads, torch "
        f"{r0['env_torch_version']} (the rows: [{LORA_FA_CSV}]({LORA_FA_CSV})).")
    return "\n".join(lines) + "\n"


UPDATE_TIME_JSON = "plots/update_time_cpu.json"


def update_time_block() -> str:
    """README's time per update: each configuration's median update time and device peak as
    ratios to full FT of the same backbone, all measured in one run of
    ``python -m benchmarks.update_time`` (:data:`UPDATE_TIME_JSON`)."""
    import json

    data = json.loads((ROOT / UPDATE_TIME_JSON).read_text())
    names = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18"}
    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    by = {(r["model"], r["config"]): r for r in data["rows"]}
    lines = ["| configuration | " + " | ".join(f"{names.get(m, m)}: time x full FT (peak x)"
                                                for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    for label in dict.fromkeys(r["config"] for r in data["rows"]):
        cells = [f"{by[(m, label)]['time_vs_full']:.2f} ({by[(m, label)]['peak_vs_full']:.2f})"
                 if (m, label) in by else "" for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    full = {m: by[(m, "full FT")] for m in models if (m, "full FT") in by}
    lines += ["", "One update at batch " + f"{data['batch']} x {data['resolution']}x"
              f"{data['resolution']} on {data['machine']} ({data['threads']} threads, torch "
              f"{data['torch']}), each configuration in a fresh process, all in one run of "
              "`python -m benchmarks.update_time`: median of 3 updates, device peak from the "
              "CPU allocator; every configuration as the sweep trains it (BN in train mode, so "
              "lean cannot make BN lean; `--bn freeze` would), sparse ones with the prefix in 8 "
              "chunks; full FT took " + ", ".join(
                  f"{r['time_s']:.1f} s and {r['peak'] / 2**20:,.0f} MiB on {names.get(m, m)}"
                  for m, r in full.items()) + "."]
    return "\n".join(lines) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "plan": plan_block,
    "default-run": default_run_block,
    "default-run-details": default_run_details_block,
    "study-flops": study_flops_block,
    "onnx-ops": onnx_ops_block,
    "lean-memory": lean_memory_block,
    "device-truth": device_truth_block,
    "device-truth-generality": device_truth_generality_block,
    "planner-truth": planner_truth_block,
    "sparse-memory": sparse_memory_block,
    "budget": budget_block,
    "lora-fa": lora_fa_block,
    "update-time": update_time_block,
}
"""Block name -> the function that writes its markdown."""


def blocks(text: str) -> list[tuple[str, str]]:
    """``(name, body)`` of every generated block of a markdown text, in order."""
    return [(m["name"], m["body"]) for m in BLOCK.finditer(text)]


def regenerate(text: str, produce: Callable[[str], str]) -> str:
    """``text`` with every block's body replaced by ``produce(name)``."""
    def sub(m: re.Match) -> str:
        return m.group(1) + produce(m["name"]) + m.group(4)

    return BLOCK.sub(sub, text)


def run(write: bool, root: Path = ROOT, only: Sequence[str] | None = None,
        log=print) -> list[str]:
    """Regenerate the blocks of :func:`documents` (``only``: just those names); write the files
    (``write``) or report the stale ones. Returns the stale blocks as ``"file: name"``.

    Unknown block names are refused (``ValueError``) before anything is computed or written."""
    docs = {p: p.read_text() for p in documents(root)}
    names = [n for text in docs.values() for n, _ in blocks(text)]
    unknown = sorted(set(names) - set(GENERATORS))
    if unknown:
        raise ValueError(f"unknown readme-figures block(s) {unknown}; known: "
                         f"{', '.join(GENERATORS)}")
    produced: dict[str, str] = {}  # the same name in two files is produced once

    def produce(name: str, current: dict[str, str]) -> str:
        if only is not None and name not in only:
            return current[name]
        if name not in produced:
            with _shipped_scratch_model():
                produced[name] = GENERATORS[name]()
        return produced[name]

    stale: list[str] = []
    for path, text in docs.items():
        current = dict(blocks(text))
        new = regenerate(text, lambda n, cur=current: produce(n, cur))
        if new == text:
            continue
        rel = path.relative_to(root)
        for (name, old), (_, body) in zip(blocks(text), blocks(new), strict=True):
            if old != body:
                stale.append(f"{rel}: {name}")
                if not write:
                    log("".join(difflib.unified_diff(
                        old.splitlines(True), body.splitlines(True),
                        f"{rel} ({name}, committed)", f"{rel} ({name}, regenerated)")))
        if write:
            path.write_text(new)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.readme_figures",
        description="Regenerate (--write) or check (--check) every code-produced table and "
        "output block of README.md and docs/*.md (the <!-- readme-figures: NAME --> blocks).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="rewrite the stale blocks in place")
    g.add_argument("--check", action="store_true",
                   help="print a diff of every stale block and exit 1 if there is one")
    p.add_argument("--root", default=str(ROOT),
                   help="the repository whose README.md and docs/ to regenerate (default: this "
                   "one; the figures are always computed from this checkout's code and data)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated block names (default: all of {', '.join(GENERATORS)})")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    bad = sorted(set(only or ()) - set(GENERATORS))
    if bad:
        p.error(f"unknown --only block(s) {bad}; choose from {', '.join(GENERATORS)}")
    root = Path(a.root).expanduser()
    if not (root / "README.md").is_file():
        p.exit(2, f"{p.prog}: error: --root {a.root}: no README.md there; pass the "
               "repository's root folder (the one holding README.md and docs/)\n")
    try:
        stale = run(a.write, root=root, only=only)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if a.write:
        print(f"{len(stale)} block(s) rewritten" + (": " + ", ".join(stale) if stale else ""))
        return 0
    if stale:
        print(f"{len(stale)} stale block(s): {', '.join(stale)}; run "
              "python -m benchmarks.readme_figures --write", file=sys.stderr)
        return 1
    print("every generated block is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
