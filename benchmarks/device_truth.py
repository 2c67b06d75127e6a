"""Device truth: predicted device peak against the peak the device really holds, per configuration.

``python -m benchmarks.device_truth [--device cpu|cuda] [--quick]`` builds each configuration
(model x method x variant, adapters/projection on every conv at rank 8, head trainable; BN in
train mode for full fine-tuning, frozen otherwise) and, at each size, puts side by side:

* ``tensors``: the analytic tensor-level peak (what ops return; exact, device-independent);
* ``predicted``: the analytic device peak, tensors plus each op's kernel scratch from the scratch
  model of :mod:`convpeft.profiler.scratch` for ``--device`` (its calibration if
  ``python -m convpeft.plan --calibrate`` cached one for this machine, else the shipped default);
* ``measured``: one real update's peak read from the device itself, independently of the
  profiler's tracker (:func:`convpeft.planner.verify.measure_peak`: the CPU allocator's
  allocation trace, or ``max_memory_allocated`` on CUDA, with ``max_memory_reserved`` beside
  it);

with the prediction's error, the measured ratio to full fine-tuning of the same model and size,
the op the device peaked in, and the op kinds the scratch model never measured
(``unmeasured_ops``: predicted with its margin). Variants: ``plain``, ``lean``
(:func:`convpeft.lean_activations`), ``lean+ckpt`` (plus :func:`convpeft.checkpoint_blocks`)
and ``lean+K<k>`` (a sparse update: lean, only the last k blocks train,
:mod:`convpeft.memory.sparse`).
The timm models are skipped when timm is not installed. ``--quick`` runs two small models at toy
sizes (what the tests run); ``--json PATH`` writes the rows (and, under ``skipped``, the
configurations a model refused, with the reason). The default matrix at 64 x 224x224
holds several GiB per full fine-tuning row and takes tens of minutes on a 2-core CPU.

``--generality`` runs the generality matrix instead (:data:`GENERALITY`): torchvision and timm
families none of which the scratch model was calibrated on, each with full fine-tuning, LoRA,
LoRA lean, LoRA-FA lean, DoRA and a sparse update, at a size other than the calibration's
(with ``--quick``: two of them at a toy size).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

MiB = 2**20
MODELS = ("mobilenet_v2", "resnet18", "mobilenet_v3_small", "timm:mobilenetv3_large_100")
METHODS = ("full", "lora", "lora-fa", "dora", "galore")
VARIANTS = ("plain", "lean", "lean+ckpt")  # the default matrix's; lean+K<k> is valid too
SIZES = ((8, 112), (64, 224))
QUICK = {"models": ("mobilenet_v2", "resnet18"), "methods": ("full", "lora"),
         "variants": ("plain", "lean+ckpt"), "sizes": ((2, 64),)}
GENERALITY = {
    # none of these families is in convpeft.profiler.calibrate.CALIBRATION
    "models": ("efficientnet_b0", "shufflenet_v2_x1_0", "densenet121", "resnet50",
               "mobilenet_v3_large", "mnasnet1_0", "regnet_y_400mf", "googlenet",
               "timm:resnet26d", "timm:efficientnet_b0", "timm:repvgg_a0"),
    "configs": (("full", "plain"), ("lora", "plain"), ("lora", "lean"), ("lora-fa", "lean"),
                ("dora", "plain"), ("lora", "lean+K2")),
    "sizes": ((4, 112),),  # the calibration runs batch 8 x 96x96
}
GENERALITY_QUICK = {"models": ("shufflenet_v2_x0_5", "mnasnet0_5"), "sizes": ((2, 64),)}


def model_factory(model_name: str):
    """What :func:`convpeft.plan` takes for ``model_name``: the torchvision name itself, or for
    ``timm:NAME`` a zero-argument factory of that timm model (random init, 10 classes)."""
    if not model_name.startswith("timm:"):
        return model_name

    def make() -> torch.nn.Module:
        import timm

        return timm.create_model(model_name[5:], pretrained=False, num_classes=10)

    return make


def _build(model_name: str, device: str) -> torch.nn.Module:
    made = model_factory(model_name)
    if callable(made):
        return made().to(device)
    from convpeft.models import build_model

    return build_model(made, 10).to(device)


def buildable(model_name: str, log) -> bool:
    """False (and a line to ``log`` saying why) for a ``timm:`` model without timm installed."""
    if model_name.startswith("timm:"):
        try:
            import timm  # noqa: F401
        except ImportError:
            log(f"skipped {model_name}: timm is not installed (pip install timm)")
            return False
    return True


def prepared(model_name: str, method: str, variant: str, device: str = "cpu", rank: int = 8):
    """``model_name`` prepared for ``method`` (BN train for full FT, frozen otherwise) with the
    ``variant``'s memory options, in train mode, on ``device``."""
    from convpeft.profiler.calibrate import prepared_update

    bn = "train" if method == "full" else "freeze"
    if variant.startswith("lean+K"):  # sparse: lean, only the last K blocks train
        from convpeft.methods import MethodConfig, prepare

        p = prepare(_build(model_name, device), MethodConfig(
            method, rank=rank, bn=bn, lean=True, update_blocks=int(variant[len("lean+K"):])))
        p.train_mode()
        return p
    return prepared_update(_build(model_name, device), method, bn,
                           variant in ("lean", "lean+ckpt"), variant == "lean+ckpt",
                           rank=rank, device=device)


def measure_row(model_name: str, method: str, variant: str, batch: int, resolution: int,
                device: str) -> dict:
    """One row of the matrix (see the module docstring); figures in bytes."""
    from convpeft.planner.verify import measure_peak
    from convpeft.profiler import analytic_profile

    torch.manual_seed(0)
    p = prepared(model_name, method, variant, device)
    shape = (batch, 3, resolution, resolution)
    a = analytic_profile(p.model, p.optimizer, shape, compare_torch=False, device=device)
    measured, allocated = measure_peak(p.model, p.optimizer, batch, resolution, 10, device)
    if device == "cuda":  # the criterion is reserved; the prediction is of allocated bytes
        reserved, measured = measured, allocated
    else:
        reserved = None
    return {"model": model_name, "method": method, "variant": variant, "batch": batch,
            "resolution": resolution, "device": device, "tensors": a.memory_peak_tensors,
            "predicted": a.memory_peak, "measured": measured, "reserved": reserved,
            "error": a.memory_peak / measured - 1, "predicted_op": a.memory_peak_op,
            "memory_model": a.memory_model, "unmeasured_ops": a.memory_unmeasured_ops}


def run(models: Sequence[str], methods: Sequence[str], variants: Sequence[str],
        sizes: Sequence[tuple[int, int]], device: str, log=None,
        configs: Sequence[tuple[str, str]] | None = None,
        skipped: list[dict] | None = None) -> list[dict]:
    """Every row of the matrix (or, with ``configs``, those (method, variant) pairs only), with
    ``vs_full`` (measured / full FT's measured, same model and size) filled in where full FT
    (plain) was measured first. A configuration the model refuses (``ValueError``) is logged,
    appended to ``skipped`` with its reason, and left out."""
    if log is None:
        def log(line: str) -> None:
            print(line, flush=True)
    rows = []
    for model_name in models:
        if not buildable(model_name, log):
            continue
        for batch, res in sizes:
            full = None
            pairs = configs or [(m, v) for m in methods for v in variants]
            for method, variant in pairs:
                t0 = time.perf_counter()
                try:
                    r = measure_row(model_name, method, variant, batch, res, device)
                except ValueError as e:  # a configuration the model cannot take: say which
                    reason = str(e).strip().splitlines()[0]
                    if skipped is not None:
                        skipped.append({"model": model_name, "method": method,
                                        "variant": variant, "batch": batch, "resolution": res,
                                        "reason": reason})
                    log(f"skipped {model_name} {method} {variant} {batch}x{res}: {reason}")
                    continue
                if method == "full" and variant == "plain":
                    full = r["measured"]
                r["vs_full"] = r["measured"] / full if full else None
                rows.append(r)
                log(format_row(r) + f"  [{time.perf_counter() - t0:.0f} s]")
    return rows


def format_row(r: dict) -> str:
    vs = f"{r['vs_full']:.3f}" if r.get("vs_full") else "  -  "
    return (f"{r['model']:<28} {r['method']:<8} {r['variant']:<10} "
            f"{r['batch']:>3}x{r['resolution']:<4} tensors {r['tensors'] / MiB:8.1f}  "
            f"predicted {r['predicted'] / MiB:8.1f}  measured {r['measured'] / MiB:8.1f} MiB  "
            f"error {r['error']:+6.2%}  vs full {vs}")


def summary(rows: Sequence[dict]) -> dict:
    """Largest and median absolute prediction error, and how many rows are within 3%."""
    import statistics

    errs = [abs(r["error"]) for r in rows]
    return {"rows": len(rows), "max_abs_error": max(errs) if errs else None,
            "median_abs_error": statistics.median(errs) if errs else None,
            "within_3pct": sum(e <= 0.03 for e in errs)}


def _size(s: str) -> tuple[int, int]:
    try:
        b, r = s.lower().split("x")
        return int(b), int(r)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is BATCHxRESOLUTION, e.g. 64x224 (got {s!r})"
                                         ) from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_truth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated; timm:NAME for a timm model")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sizes", default=",".join(f"{b}x{r}" for b, r in SIZES),
                    help="comma-separated BATCHxRESOLUTION")
    ap.add_argument("--configs", default=None,
                    help="comma-separated METHOD:VARIANT pairs instead of --methods x --variants "
                    "(e.g. full:plain,lora:lean,lora:lean+ckpt)")
    ap.add_argument("--quick", action="store_true",
                    help="MobileNetV2 and ResNet18, full/lora, plain and lean+ckpt, batch 2 x "
                    "64x64 (overrides the matrix options)")
    ap.add_argument("--generality", action="store_true",
                    help="the generality matrix: families the scratch model was not calibrated "
                    "on, full/LoRA/LoRA lean/LoRA-FA lean/DoRA/sparse, batch 4 x 112x112 (with "
                    "--quick: two small models at 2 x 64x64; overrides the matrix options)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: error: --device cuda needs a CUDA GPU here\n")
    if a.quick:
        models, methods, variants, sizes = (QUICK["models"], QUICK["methods"],
                                            QUICK["variants"], QUICK["sizes"])
    else:
        models = [m for m in a.models.split(",") if m]
        methods = [m for m in a.methods.split(",") if m]
        variants = [v for v in a.variants.split(",") if v]
        sizes = [_size(s) for s in a.sizes.split(",") if s]
    configs = None
    if a.generality:
        g = GENERALITY_QUICK if a.quick else GENERALITY
        models, sizes = g["models"], g["sizes"]
        configs = list(GENERALITY["configs"])
        variants = [v for _, v in configs]
    elif a.configs and not a.quick:
        configs = [tuple(c.split(":", 1)) for c in a.configs.split(",") if c]
        if any(len(c) != 2 for c in configs):
            ap.exit(2, f"{ap.prog}: error: --configs takes METHOD:VARIANT pairs\n")
        variants = [v for _, v in configs]
    bad = [v for v in variants if v not in VARIANTS and not re.fullmatch(r"lean\+K\d+", v)]
    if bad:
        ap.exit(2, f"{ap.prog}: error: unknown variant(s) {bad}; use {', '.join(VARIANTS)} or "
                   "lean+K<k>\n")
    skipped: list[dict] = []
    rows = run(models, methods, variants, sizes, a.device, configs=configs, skipped=skipped)
    s = summary(rows)
    print(f"{s['within_3pct']} of {s['rows']} rows predicted within 3% of the measured device "
          f"peak (largest error {s['max_abs_error']:.2%}, median {s['median_abs_error']:.2%}); "
          "model: "
          f"{rows[0]['memory_model'] if rows else '-'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": s, "rows": rows, "skipped": skipped},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
