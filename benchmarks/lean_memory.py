"""Peak memory of one update, plain vs memory-lean (:func:`convpeft.lean_activations`).

``python -m benchmarks.lean_memory`` predicts with the analytic profiler (shapes only, no data)
the peak of one AdamW update at batch 64 x 224x224 (``--batch``, ``--resolution``) for
MobileNetV2 and ResNet18: full fine-tuning with BN in train mode (the study's baseline), full
FT with BN frozen, and head / LoRA / LoRA-FA / DoRA (r=8, every conv, head trainable, BN
frozen), each plain and lean. Ratios are against the baseline measured in the same run.
``--measure`` also runs real updates of each at a small size (batch 8 x 64x64): the measured
peak (:func:`convpeft.profiler.profile_update`) next to the analytic one at that size, and for
each lean row the step-time ratio lean/plain of the same method, timed interleaved on one
model (lean switched on and off between updates; median CPU time, steadier than wall time on
a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from convpeft.lean import lean_activations, restore_activations
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
                if lean:
                    row["time_ratio"] = time_ratio(name, method, bn, rank)
            rows.append(row)
    return rows


def _update(model, optimizer, x, y) -> float:
    optimizer.zero_grad(set_to_none=True)
    c0 = time.process_time()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.process_time() - c0


def time_ratio(name: str, method: str, bn: str, rank: int, batch: int = 8,
               resolution: int = 64, rounds: int = 7) -> float:
    """Median CPU time of a lean update over that of the plain update of the same prepared
    model, the two alternating (ABBA order) so that load on the machine hits both alike."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    p = prepared(name, method, bn, False, rank)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds + 1):
        for lean in ((False, True) if r % 2 else (True, False)):
            (lean_activations if lean else restore_activations)(p.model)
            t = _update(p.model, p.optimizer, x, y)
            if r:  # round 0 warms up both
                times[lean].append(t)
    return statistics.median(times[True]) / statistics.median(times[False])


def _measure(name, method, bn, lean, rank, batch=8, resolution=64) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    p = prepared(name, method, bn, lean, rank)
    a = analytic_profile(p.model, p.optimizer, tuple(x.shape), compare_torch=False)
    m = profile_update(p.model, p.optimizer, x, y,
                       repeat=5, compare_torch=False)
    return {"small_measured_mib": m.memory_peak / MiB, "small_analytic_mib": a.memory_peak / MiB,
            "small_analytic_error": a.memory_peak / m.memory_peak - 1}


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
            extra = (f" | b8x64: measured {r['small_measured_mib']:6.1f} MiB, analytic "
                     f"{r['small_analytic_error']:+.2%}")
            if "time_ratio" in r:
                extra += f", time lean/plain x{r['time_ratio']:.2f}"
        print(f"{r['model']:13s} {r['config']:30s} {r['peak_mib']:9.1f} MiB  "
              f"x{r['ratio']:.3f}  (activations {r['activations_mib']:.1f} MiB){extra}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
