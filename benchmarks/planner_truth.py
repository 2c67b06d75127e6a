"""Planner truth: does the planned batch fit on the device, and is it the largest that does?

``python -m benchmarks.planner_truth [--quick] [--json PATH]`` takes the generality matrix's
families (:data:`benchmarks.device_truth.GENERALITY`: torchvision and timm CNNs the CPU device
model was never calibrated on) with two configurations each, full fine-tuning (BN in train
mode) and LoRA r=8 lean (BN frozen), and for each:

1. sets a budget between two batches: the predicted device peak at ``--target`` images plus
   half the predicted step to one image more (so an error of more than half an image's
   activations in either direction changes the plan: the hardest budget to plan for);
2. plans under it (:func:`convpeft.plan`, shapes on the meta device, no memory used);
3. measures real updates on the CPU (:func:`convpeft.planner.verify.measure_peak`, the
   allocator's trace of the second update): the planned batch, then one image more at a time
   until an update no longer fits, which gives the largest batch that fits.

A row says whether the planned batch fits on the device (``fits``) and how much of the largest
fitting batch it reaches (``reach`` = planned / largest). The targets (issue 36): every planned
batch fits, every reach >= 0.95. ``--quick`` runs two small torchvision models at a toy size
(what the tests run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

MiB = 2**20
CONFIGS = (("full", False, "train"), ("lora", True, "freeze"))  # method, lean, bn
RESOLUTION, TARGET = 112, 16
QUICK = {"models": ("shufflenet_v2_x0_5", "mnasnet0_5"), "resolution": 64, "target": 4}
MAX_UP = 12  # measurements above the plan before giving up on finding the largest fit


def check(model_name: str, method: str, lean: bool, bn: str, *, resolution: int,
          target: int) -> dict:
    """One row (see the module docstring); figures in bytes."""
    from benchmarks.device_truth import model_factory
    from convpeft.planner import plan
    from convpeft.planner.config import PlanConfig, build_configured
    from convpeft.planner.verify import measure_peak

    model = model_factory(model_name)
    kw = dict(resolution=resolution, methods=[method], ranks=[8], lean=lean, bn=bn)
    at = {b: plan(model, "1TiB", batch=b, **kw)[0].memory_peak for b in (target, target + 1)}
    budget = at[target] + (at[target + 1] - at[target]) // 2
    row = plan(model, budget, max_batch=8 * target, **kw)[0]
    planned = row.max_batch
    config = PlanConfig(method, 8 if method != "full" else None, lean)

    def measured(batch: int) -> int:
        torch.manual_seed(0)
        net, opt = build_configured(model, config, bn=bn, device="cpu")
        try:
            return measure_peak(net, opt, batch, resolution, 10, "cpu")[0]
        finally:
            del net, opt

    peaks = {planned: measured(planned)} if planned else {}
    fits = bool(planned) and peaks[planned] <= budget
    largest = planned if fits else 0
    if fits:  # one image more at a time until an update no longer fits
        for n in range(planned + 1, planned + 1 + MAX_UP):
            peaks[n] = measured(n)
            if peaks[n] > budget:
                break
            largest = n
    else:  # the plan does not fit: step down to the largest batch that does
        for n in range(planned - 1, 0, -1):
            peaks[n] = measured(n)
            if peaks[n] <= budget:
                largest = n
                break
    return {"model": model_name, "config": config.label, "bn": bn, "resolution": resolution,
            "budget": budget, "planned": planned, "predicted": row.memory_peak,
            "measured": peaks.get(planned), "fits": fits,
            "largest": largest, "reach": planned / largest if largest else None,
            "measured_by_batch": {str(k): v for k, v in sorted(peaks.items())},
            "memory_model": row.memory_model}


def run(models: Sequence[str], *, resolution: int, target: int, log=print) -> list[dict]:
    """Every (model, configuration) of the check; timm models skipped without timm."""
    from benchmarks.device_truth import buildable

    rows = []
    for model_name in models:
        if not buildable(model_name, log):
            continue
        for method, lean, bn in CONFIGS:
            t0 = time.perf_counter()
            r = check(model_name, method, lean, bn, resolution=resolution, target=target)
            rows.append(r)
            log(format_row(r) + f"  [{time.perf_counter() - t0:.0f} s]")
    return rows


def format_row(r: dict) -> str:
    reach = f"{r['reach']:.3f}" if r["reach"] is not None else "-"
    got = f"{r['measured'] / MiB:8.1f}" if r["measured"] is not None else "       -"
    return (f"{r['model']:<24} {r['config']:<12} budget {r['budget'] / MiB:8.1f} MiB  planned "
            f"{r['planned']:>3} (measured {got} MiB, {'fits' if r['fits'] else 'OVER'})  "
            f"largest fitting {r['largest']:>3}  reach {reach}")


def summary(rows: Sequence[dict]) -> dict:
    """How many plans fit, and the lowest reach."""
    reach = [r["reach"] for r in rows if r["reach"] is not None]
    return {"rows": len(rows), "fit": sum(r["fits"] for r in rows),
            "min_reach": min(reach) if reach else None,
            "reach_ge_95pct": sum(x >= 0.95 for x in reach)}


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.device_truth import GENERALITY

    ap = argparse.ArgumentParser(prog="python -m benchmarks.planner_truth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(GENERALITY["models"]),
                    help="comma-separated torchvision names or timm:NAME (default: the "
                    "generality matrix's families)")
    ap.add_argument("--resolution", type=int, default=RESOLUTION)
    ap.add_argument("--target", type=int, default=TARGET,
                    help="the batch the budget is set for (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="two small torchvision models at batch 4 x 64x64 (overrides the above)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.resolution < 8 or a.target < 1:
        ap.exit(2, f"{ap.prog}: error: --resolution must be >= 8 and --target >= 1\n")
    models = QUICK["models"] if a.quick else [m for m in a.models.split(",") if m]
    res, target = ((QUICK["resolution"], QUICK["target"]) if a.quick
                   else (a.resolution, a.target))
    rows = run(models, resolution=res, target=target)
    s = summary(rows)
    print(f"{s['fit']} of {s['rows']} planned batches fit on the device; "
          f"{s['reach_ge_95pct']} reach >= 95% of the largest that fits (lowest "
          f"{s['min_reach'] if s['min_reach'] is None else round(s['min_reach'], 3)})")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": s, "target": target, "rows": rows},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
