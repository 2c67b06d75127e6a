"""Peak memory of one update, plain vs memory-lean (:func:`convpeft.lean_activations`).

``python -m benchmarks.lean_memory`` predicts with the analytic profiler (shapes only, no data)
the peak of one AdamW update at batch 64 x 224x224 (``--batch``, ``--resolution``) for
MobileNetV2 and ResNet18: full fine-tuning with BN in train mode (the study's baseline), full
FT with BN frozen, and head / LoRA / LoRA-FA / DoRA (r=8, every conv, head trainable, BN
frozen), each plain and lean. Ratios are against the baseline measured in the same run.
``--measure`` also runs one real update of each at a small size (batch 8 x 64x64) and
prints the measured peak next to the analytic one and the step time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from convpeft.lean import lean_activations
from convpeft.methods import MethodConfig, prepare
from convpeft.models import build_model
from convpeft.profiler import analytic_profile, profile_update

MiB = 2**20
CONFIGS = [  # (label, method, bn, lean)
    ("full FT, BN train (baseline)", "full", "train", False),
    ("full FT, BN frozen", "full", "freeze", False),
    ("head only", "head", "freeze", False),
    ("head only, lean", "head", "freeze", True),
    ("LoRA", "lora", "freeze", False),
    ("LoRA, lean", "lora", "freeze", True),
    ("LoRA-FA", "lora-fa", "freeze", False),
    ("LoRA-FA, lean", "lora-fa", "freeze", True),
    ("DoRA", "dora", "freeze", False),
    ("DoRA, lean", "dora", "freeze", True),
]


def prepared(model_name: str, method: str, bn: str, lean: bool, rank: int):
    model = build_model(model_name, 10)
    p = prepare(model, MethodConfig(method, rank=rank, bn=bn))
    p.train_mode()
    if lean:
        lean_activations(p.model)
    return p


def run(models: Sequence[str], batch: int, resolution: int, rank: int, measure: bool) -> list:
    rows = []
    for name in models:
        base = None
        for label, method, bn, lean in CONFIGS:
            p = prepared(name, method, bn, lean, rank)
            prof = analytic_profile(p.model, p.optimizer, (batch, 3, resolution, resolution),
                                    compare_torch=False)
            base = base or prof.memory_peak
            row = {"model": name, "config": label, "peak_mib": prof.memory_peak / MiB,
                   "ratio": prof.memory_peak / base,
                   "activations_mib": prof.memory_by_category.get("activations", 0) / MiB}
            if measure:
                row.update(_measure(name, method, bn, lean, rank))
            rows.append(row)
    return rows


def _measure(name, method, bn, lean, rank, batch=8, resolution=64) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    p = prepared(name, method, bn, lean, rank)
    a = analytic_profile(p.model, p.optimizer, tuple(x.shape), compare_torch=False)
    m = profile_update(p.model, p.optimizer, x, y,
                       repeat=5, compare_torch=False)
    return {"small_measured_mib": m.memory_peak / MiB, "small_analytic_mib": a.memory_peak / MiB,
            "small_step_s": m.step_time_s}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lean_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--measure", action="store_true",
                    help="also measure one real update at batch 8 x 64x64 (peak, step time)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = run(a.models.split(","), a.batch, a.resolution, a.rank, a.measure)
    print(f"peak memory of one AdamW update, batch {a.batch} x {a.resolution}^2, "
          f"adapter rank {a.rank} (analytic)")
    for r in rows:
        extra = ""
        if a.measure:
            extra = (f" | b8x64: measured {r['small_measured_mib']:.1f} MiB, analytic "
                     f"{r['small_analytic_mib']:.1f} MiB, step {r['small_step_s'] * 1e3:.0f} ms")
        print(f"{r['model']:13s} {r['config']:30s} {r['peak_mib']:9.1f} MiB  "
              f"x{r['ratio']:.3f}  (activations {r['activations_mib']:.1f} MiB){extra}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
