"""Peak memory of sparse updates (last K blocks train, frozen prefix without graph, chunked).

``python -m benchmarks.sparse_memory`` runs one real AdamW update per configuration at batch
64 x 224x224 (``--batch``, ``--resolution``) on the CPU and reads the device's peak
(``profile_update``'s ``memory_peak``: torch.profiler's allocation trace, kernel scratch
included), next to the tensor-level peak of the same update (``memory_peak_tensors``) and the
device peak predicted from shapes alone (:func:`convpeft.profiler.analytic_profile`: tensors
plus each op's kernel scratch from the CPU scratch model). Ratios are the device peak over that
of full fine-tuning with BN in train mode (the study's baseline), measured in the same run;
``predicted err`` is the prediction over the measured peak.

Configurations (``--configs``, comma-separated labels; MobileNetV2's blocks are ``features[0..18]``,
ResNet18's ``layer1.0`` ... ``layer4.1``): the baseline, LoRA r=8 on every conv lean +
checkpointed (the exact update of every layer, for reference), and sparse updates
``MethodConfig(update_blocks=K, prefix_chunks=N, lean=True)`` of LoRA, BitFit, full FT and
head only (K=0: the whole backbone is the frozen prefix), and full FT of the last 8 blocks
(MobileNetV2) or of the last 2 and 4 (ResNet18) with those blocks checkpointed too
(``ckpt``). Sparse rows train BN in train mode inside the last K blocks; the prefix's BN is
frozen (eval). ``--quick``: batch 4 x 64x64, two configurations per model (for tests). One
configuration at a time: at 64 x 224x224 each needs up to ~5 GiB and a minute or more of a
2-core CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Sequence

import torch

from convpeft.methods import MethodConfig, prepare
from convpeft.models import build_model
from convpeft.profiler import analytic_profile, profile_update

MiB = 2**20
# label -> MethodConfig keywords (rank 8 where the method takes one); per model the K differ
BASELINE = "full (BN train)"
_EVERY_LAYER = {
    BASELINE: {"name": "full"},
    "lora lean+ckpt (every layer)": {"name": "lora", "lean": True, "checkpoint": True},
}


def _sparse(method: str, k: int, chunks: int = 8, ckpt: bool = False) -> tuple[str, dict]:
    """``(label, keywords)`` of a sparse update: the last ``k`` blocks train (lean, except head
    only, which has nothing to make lean), the frozen prefix in ``chunks`` micro-batches, and
    with ``ckpt`` the trainable blocks checkpointed (exact: the accuracy of the same row
    without it)."""
    kw: dict = {"name": method, "update_blocks": k}
    if chunks != 1:
        kw["prefix_chunks"] = chunks
    if method != "head":
        kw["lean"] = True
    if ckpt:
        kw["checkpoint"] = True
    return (f"{method} K={k}" + (f" chunks={chunks}" if chunks != 1 else "")
            + (" ckpt" if ckpt else "")), kw


CONFIGS: dict[str, dict[str, dict]] = {
    "mobilenet_v2": {**_EVERY_LAYER, **dict(_sparse(*c) for c in (
        ("lora", 4, 1), ("lora", 4), ("lora", 8), ("lora", 1), ("lora", 2), ("full", 1),
        ("full", 2), ("full", 4), ("full", 8), ("bitfit", 8), ("head", 0), ("full", 8, 8, True)))},
    "resnet18": {**_EVERY_LAYER, **dict(_sparse(*c) for c in (
        ("lora", 2, 1), ("lora", 2), ("lora", 4), ("lora", 8), ("lora", 1), ("full", 1),
        ("full", 2), ("full", 4), ("full", 8), ("head", 0), ("full", 2, 8, True),
        ("full", 4, 8, True)))},
}

QUICK = (BASELINE, "lora K=4 chunks=8", "lora K=2 chunks=8")


def measure(model_name: str, label: str, batch: int, resolution: int) -> dict:
    """One configuration: device (allocator), tensor-level and predicted device peak of one
    update (bytes)."""
    kw = dict(CONFIGS[model_name][label])
    torch.manual_seed(0)
    model = build_model(model_name, 10)
    p = prepare(model, MethodConfig(rank=8, **kw))
    p.train_mode()
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    t0 = time.perf_counter()
    analytic = analytic_profile(p.model, p.optimizer, tuple(x.shape), compare_torch=False)
    m = profile_update(p.model, p.optimizer, x, y, repeat=0, compare_torch=False)
    sparse = p.extra.get("sparse")
    return {"model": model_name, "config": label, "method": kw["name"],
            "update_blocks": kw.get("update_blocks"), "prefix_chunks": kw.get("prefix_chunks", 1),
            "checkpoint": bool(kw.get("checkpoint")),
            "trainable_params": p.trainable_params, "total_params": p.total_params,
            "prefix_modules": len(sparse.prefix) if sparse else 0,
            "allocator_peak": m.memory_peak, "tensor_peak": m.memory_peak_tensors,
            "analytic_peak": analytic.memory_peak, "memory_model": analytic.memory_model,
            "flops_total": m.flops_total,
            "step_time_s": m.step_time_s, "seconds": time.perf_counter() - t0}


def run(models: Sequence[str], labels: Sequence[str] | None, batch: int, resolution: int,
        out=print) -> list[dict]:
    rows = []
    for name in models:
        chosen = [c for c in CONFIGS[name] if labels is None or c in labels]
        if BASELINE not in chosen:
            chosen.insert(0, BASELINE)  # ratios need it
        base = None
        for label in chosen:
            r = measure(name, label, batch, resolution)
            gc.collect()
            base = base or r["allocator_peak"]
            r["ratio"] = r["allocator_peak"] / base
            r["analytic_error"] = r["analytic_peak"] / r["allocator_peak"] - 1
            rows.append(r)
            out(format_row(r))
    return rows


def format_row(r: dict) -> str:
    return (f"{r['model']:13s} {r['config']:30s} allocator {r['allocator_peak'] / MiB:8.1f} MiB "
            f"x{r['ratio']:.3f}  tensors {r['tensor_peak'] / MiB:8.1f}  predicted "
            f"{r['analytic_peak'] / MiB:8.1f} ({r['analytic_error']:+.1%})  trainable "
            f"{r['trainable_params']:>9,}  {r['flops_total'] / 1e9:6.1f} GFLOP  "
            f"({r['seconds']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sparse_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--configs", default=None,
                    help="comma-separated labels (default: all of the model's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="batch 4 x 64x64, three configurations")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    models = a.models.split(",")
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    labels = a.configs.split(",") if a.configs else None
    batch, resolution = (4, 64) if a.quick else (a.batch, a.resolution)
    if a.quick:
        labels = list(QUICK)
    torch.set_num_threads(a.threads)
    print(f"one AdamW update, batch {batch} x {resolution}^2, CPU; peaks in MiB; x: allocator "
          f"peak over full FT with BN train's; predicted: from shapes only, vs the allocator")
    t0 = time.perf_counter()
    rows = run(models, labels, batch, resolution)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"batch": batch, "resolution": resolution, "rows": rows}, f, indent=1)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
