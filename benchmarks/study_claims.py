"""The study's cost claims (arXiv 2507.23536), reproduced in its setup and then corrected.

The study most likely adapted only the convs peft accepts (``groups == 1``: peft refuses a
depthwise rank not divisible by the channel count) and counted FLOPs with torch-style rules,
which charge a depthwise conv's weight gradient as if the conv were dense (``C_in`` times its
real cost). Full fine-tuning computes those gradients, a LoRA update on the standard convs does
not, so the dense charge inflates full FT alone and the saving looks enormous. This module
computes, with the analytic profiler (shapes only, seconds, no data):

* :func:`flop_headline`: one update of MobileNetV3-small at batch 1 x 224x224, LoRA r=1 vs full
  FT, counted four ways: torch's ``FlopCounterMode`` (the study's counter), torch-style conv
  rules plus the elementwise work (BN, activations, pooling, loss), ours (2 FLOPs per MAC,
  grouped/depthwise convs as they run: :mod:`convpeft.profiler.flop_counter`), each with the
  adapters on the ``standard`` convs (the study's) and on every conv (``conv``, ours);
* :func:`memory_claim`: the peak-memory saving of LoRA vs full FT (BN in train mode, the
  study's baseline) per model, at batch 1 and at batch 32, plain and with
  :func:`convpeft.lean_activations` (BN train, as a ``--lean`` sweep runs it, and BN frozen,
  which lets BN go lean too).

``python -m benchmarks.study_claims`` prints both. The sweep's ``--preset study`` measures the
same claims on real updates, and ``findings.md`` shows them side by side from the rows
(:func:`benchmarks.sweep.findings.study_claims`); this module is the seconds-long check of the
headline, not a second source of findings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.common import write_json
from benchmarks.lean_memory import MiB, prepared
from convpeft.profiler import UpdateProfile, analytic_profile

STUDY_TARGET = "standard"
"""The layers the study could adapt with peft: every ``groups == 1`` conv (pointwise too)."""
OUR_TARGET = "conv"
"""Every conv, depthwise included (convpeft's default)."""
MEMORY_MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18")
MEMORY_CONFIGS = (  # (label, method, bn, lean)
    ("full FT", "full", "train", False),
    ("LoRA", "lora", "train", False),
    ("LoRA, lean", "lora", "train", True),
    ("LoRA, lean, BN frozen", "lora", "freeze", True),
)


def _profile(model: str, method: str, target: str, rank: int, shape: tuple[int, ...], *,
             bn: str = "train", lean: bool = False, torch_count: bool = True) -> UpdateProfile:
    p = prepared(model, method, bn, lean, rank, target=target)
    # tensor-level (device=None), like the sweep's rows it is checked against: the study's
    # claims are about what PEFT saves, the same on every CPU; the device adds oneDNN scratch
    return analytic_profile(p.model, p.optimizer, shape, compare_torch=torch_count, device=None)


def _saving(adapted: float | None, full: float | None) -> float | None:
    return None if adapted is None or not full else 1 - adapted / full


def flop_headline(model: str = "mobilenet_v3_small", rank: int = 1, batch: int = 1,
                  resolution: int = 224) -> dict:
    """The FLOP saving of one LoRA update vs full FT, counted the study's way and correctly.

    Returns the figures (forward + backward, no optimizer arithmetic) and the savings:
    ``torch_counter`` (torch's FlopCounterMode), ``torch_rules_elementwise`` (the same conv
    rules plus the elementwise work) and ``ours``, each for ``standard`` (the study's adapters)
    and ``conv`` (every conv), as ``saving_<count>_<target>``.
    """
    shape = (batch, 3, resolution, resolution)
    profs = {"full": _profile(model, "full", OUR_TARGET, rank, shape)}
    for target in (STUDY_TARGET, OUR_TARGET):
        profs[target] = _profile(model, "lora", target, rank, shape)
    counts = {
        "ours": lambda p: p.flops_forward + p.flops_backward,
        "torch_counter": lambda p: p.flops_torch,
        "torch_rules_elementwise": lambda p: p.flops_torch + p.flops_elementwise,
    }
    out: dict = {"model": model, "rank": rank, "batch": batch, "resolution": resolution}
    for name, fn in counts.items():
        out[f"full_{name}"] = fn(profs["full"])
        for target in (STUDY_TARGET, OUR_TARGET):
            out[f"lora_{name}_{target}"] = fn(profs[target])
            out[f"saving_{name}_{target}"] = _saving(fn(profs[target]), fn(profs["full"]))
    return out


def memory_claim(models: Sequence[str] = MEMORY_MODELS, batches: Sequence[int] = (1, 32),
                 resolution: int = 224, rank: int = 1, target: str = STUDY_TARGET) -> list[dict]:
    """Peak of one update per (model, batch, configuration of :data:`MEMORY_CONFIGS`) and its
    saving vs full FT's plain peak with BN in train mode (the study's baseline)."""
    rows = []
    for model in models:
        for batch in batches:
            shape = (batch, 3, resolution, resolution)
            full = None
            for label, method, bn, lean in MEMORY_CONFIGS:
                peak = _profile(model, method, target, rank, shape, bn=bn, lean=lean,
                                torch_count=False).memory_peak
                full = full or peak
                rows.append({"model": model, "batch": batch, "resolution": resolution,
                             "config": label, "target": target, "rank": rank,
                             "peak_mib": peak / MiB, "saving": _saving(peak, full)})
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_headline(h: dict) -> str:
    lines = [f"{h['model']}, LoRA r={h['rank']} vs full FT, one update at batch {h['batch']} x "
             f"{h['resolution']}x{h['resolution']} (forward + backward):",
             f"  {'counted as':<44} {'standard convs (study)':>24} {'every conv (ours)':>18}"]
    for name, label in (("torch_counter", "torch's FlopCounterMode (the study's)"),
                        ("torch_rules_elementwise", "torch's conv rules + elementwise work"),
                        ("ours", "correctly (depthwise grads as they run)")):
        lines.append(f"  {label:<44} {_pct(h[f'saving_{name}_{STUDY_TARGET}']):>24} "
                     f"{_pct(h[f'saving_{name}_{OUR_TARGET}']):>18}")
    return "\n".join(lines)


def format_memory(rows: Sequence[dict]) -> str:
    lines = [f"Peak-memory saving vs full FT (BN train), LoRA r={rows[0]['rank']} on "
             f"{rows[0]['target']} convs, {rows[0]['resolution']}x{rows[0]['resolution']}:",
             f"  {'model':<20} {'batch':>5} {'full FT [MiB]':>14} "
             + " ".join(f"{c[0]:>22}" for c in MEMORY_CONFIGS[1:])]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    for (model, batch), rs in groups.items():
        lines.append(f"  {model:<20} {batch:>5} {rs[0]['peak_mib']:>14.1f} "
                     + " ".join(f"{_pct(r['saving']):>22}" for r in rs[1:]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.study_claims",
        description="The study's FLOP headline (MobileNetV3-small, LoRA r=1 on standard convs, "
        "batch 1 x 224x224) counted its way and correctly, and LoRA's peak-memory saving vs "
        "full FT at batch 1 and 32, plain and lean. Analytic profiles: shapes only, no data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_small", help="model of the FLOP headline")
    p.add_argument("--rank", type=int, default=1, help="LoRA rank")
    p.add_argument("--models", default=",".join(MEMORY_MODELS),
                   help="comma-separated models of the memory table ('' skips it)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (memory)")
    p.add_argument("--resolution", type=int, default=224, help="image side in pixels")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    h = flop_headline(a.model, a.rank, 1, a.resolution)
    print(format_headline(h))
    mem: list[dict] = []
    models = [m for m in a.models.split(",") if m]
    if models:
        mem = memory_claim(models, [int(b) for b in a.batches.split(",") if b], a.resolution,
                           a.rank)
        print()
        print(format_memory(mem))
    write_json(a.json, [h, *mem])
    return 0


if __name__ == "__main__":
    sys.exit(main())
