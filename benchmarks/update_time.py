"""Time and device peak of one update at the deployment size, as ratios to full fine-tuning.

``python -m benchmarks.update_time`` measures, for each backbone of the default sweep
(MobileNetV2, ResNet18 with the ImageNet stem) at batch 64 x 224x224 (``--cost-at``) on this
CPU, one configuration after another, each in a fresh process
(:func:`benchmarks.sweep.cost.measure_fresh`, what the sweep's ``--measure-cost`` runs): the
CPU allocator's peak of the second update and the median wall time of three more. Every ratio
divides two measurements of this one invocation (full FT of the same backbone is measured
first), on one machine, which the output names. Configurations (:data:`CONFIGS`): full FT,
LoRA r=4 (BN in train mode, every conv, as the sweep trains it), LoRA lean, LoRA lean +
checkpointed blocks, LoRA-FA lean, and the memory-budget configurations of ``--preset budget``
(full FT and LoRA of the last 2 blocks, the frozen prefix in 8 chunks with its statistics
from the target data).

``--json FILE`` writes the rows (README's "Time per update" block reads
``plots/update_time_cpu.json``); ``--quick`` measures two configurations of MobileNetV2 at
batch 2 x 64x64 (seconds; for tests). One configuration at a time, nothing else running: a
time measured beside other work is that work's too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence

import torch

from benchmarks.sweep.cost import measure_fresh, parse_cost_at
from benchmarks.sweep.grid import Config, SweepSettings

# label -> (method, rank, update_blocks, settings overrides); the first is the reference
CONFIGS: dict[str, tuple[str, int | None, int | None, dict]] = {
    "full FT": ("full", None, None, {}),
    "LoRA r=4": ("lora", 4, None, {}),
    "LoRA r=4 lean": ("lora", 4, None, {"lean": True}),
    "LoRA r=4 lean + ckpt": ("lora", 4, None, {"lean": True, "checkpoint": True}),
    "LoRA-FA r=4 lean": ("lora-fa", 4, None, {"lean": True}),
    "full FT last 2 blocks": ("full", None, 2, {}),
    "LoRA r=4 last 2 blocks": ("lora", 4, 2, {}),
}
QUICK = ("full FT", "LoRA r=4 lean")
MODELS = ("mobilenet_v2", "resnet18")
NUM_CLASSES = 10


def measure(models: Sequence[str], labels: Sequence[str], batch: int, resolution: int,
            log=print) -> list[dict]:
    """One row per (model, configuration): ``peak`` (bytes), ``time_s`` (median), ``times``,
    and ``time_vs_full`` / ``peak_vs_full`` against the first configuration of its model."""
    base = SweepSettings(dataset={"shift": "digits"}, cost_batch=batch,
                         cost_resolution=resolution, prefix_chunks=8, prefix_stats="target")
    rows = []
    for model in models:
        ref = None
        for label in labels:
            method, rank, blocks, over = CONFIGS[label]
            s = dataclasses.replace(base, **over)
            t0 = time.perf_counter()
            m = measure_fresh(Config(model, "shift", method, rank, 0, blocks), s, NUM_CLASSES)
            row = {"model": model, "config": label, "peak": m["peak"],
                   "time_s": statistics.median(m["times"]), "times": m["times"]}
            ref = ref or row
            row["time_vs_full"] = row["time_s"] / ref["time_s"]
            row["peak_vs_full"] = row["peak"] / ref["peak"]
            rows.append(row)
            log(f"{model:13} {label:24} {row['time_s']:7.3f} s  x{row['time_vs_full']:.2f}  "
                f"peak {row['peak'] / 2**20:8.1f} MiB  x{row['peak_vs_full']:.3f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.update_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost-at", default="64x224", help="BATCHxRESOLUTION of the update")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated backbones")
    ap.add_argument("--quick", action="store_true",
                    help="MobileNetV2, two configurations, batch 2 x 64x64")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    try:
        batch, res = parse_cost_at("2x64" if a.quick else a.cost_at)
    except ValueError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    models = ["mobilenet_v2"] if a.quick else [m for m in a.models.split(",") if m]
    labels = QUICK if a.quick else tuple(CONFIGS)
    from benchmarks.sweep.cost import device_name

    machine = device_name("cpu")
    print(f"one update at batch {batch} x {res}x{res}, {machine}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = measure(models, labels, batch, res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"batch": batch, "resolution": res, "machine": machine,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
