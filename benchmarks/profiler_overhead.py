"""Profiler overhead and FLOPs ours-vs-torch, MobileNetV2 and ResNet18, full FT / LoRA / DoRA /
GaLore at ranks 1..64 (not a test).

    python -m benchmarks.profiler_overhead [--quick] [--batch 8] [--resolution 32] \
        [--device cpu|cuda] [--json F]

For each configuration it runs :func:`convpeft.profiler.profile_update` (1 warm-up, 1
instrumented, ``--repeat`` timed updates) and prints: the plain step time (median of the timed
updates), the instrumented update's time and its ratio to a plain step, in wall time and in this
process's CPU time (steadier on a shared machine) -- the profiling overhead, torch's
FlopCounterMode figure included --, the whole call's wall time, our FLOPs of the
update (conv/linear/matmul, 2 per MAC) next to torch's FlopCounterMode figure for the same update,
and the true peak memory. For full fine-tuning it also prints fvcore's forward count (its MACs
times 2), which must equal our forward figure. The last line is the total wall time. Timings
are noisy on a shared machine; FLOPs and memory are exact. ``--device cuda`` runs the updates on
the GPU (refused, one line and exit status 2, where CUDA is unavailable); the CPU-time columns
then miss the device work.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from convpeft.profiler import profile_update
from convpeft.profiler.fvcore_flops import fvcore_forward_flops

MODELS = ("mobilenet_v2", "resnet18")
METHODS = ("full", "lora", "dora", "galore")
RANKS = (1, 2, 4, 8, 16, 32, 64)
QUICK_RANKS = (1, 8, 64)


def _prepare(model_name: str, method: str, rank: int, num_classes: int = 10,
             device: str = "cpu"):
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model

    model = build_model(model_name, num_classes, small_input=False).to(device)
    prep = prepare(model, MethodConfig(method, rank=rank))
    prep.train_mode()
    return prep.model, prep.optimizer


def run(models=MODELS, methods=METHODS, ranks=RANKS, *, batch: int = 8, resolution: int = 32,
        repeat: int = 3, seed: int = 0, verbose: bool = True, device: str = "cpu") -> list[dict]:
    """Profile every (model, method, rank) and return one row (dict) per configuration.

    ``full`` has no rank and runs once per model. A method whose setup fails (e.g. GaLore not
    installed in this tree yet) yields a row with an ``error`` entry instead of figures.
    """
    rows: list[dict] = []
    if verbose:
        print(f"batch {batch} at {resolution}x{resolution} on {device}, "
              f"CPU threads {torch.get_num_threads()}")
        print(f"{'model':<13}{'method':<7}{'rank':>5} {'step ms':>8} {'instr ms':>9} "
              f"{'x step':>7} {'x cpu':>6} {'wall s':>7} {'ours MF':>10} {'torch MF':>10} "
              f"{'torch/ours':>10} {'peak MiB':>9}")
    for model_name in models:
        for method in methods:
            for rank in ((0,) if method == "full" else ranks):
                torch.manual_seed(seed)
                row: dict = {"model": model_name, "method": method, "rank": rank or None}
                try:
                    model, opt = _prepare(model_name, method, rank or 8, device=device)
                except (ImportError, ValueError, TypeError) as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    if verbose:
                        print(f"{model_name:<13}{method:<7}{rank:>5}  skipped: {row['error']}")
                    continue
                x = torch.randn(batch, 3, resolution, resolution, device=device)
                y = torch.randint(0, 10, (batch,), device=device)
                t0 = time.perf_counter()
                p = profile_update(model, opt, x, y, warmup=1, repeat=repeat)
                wall = time.perf_counter() - t0
                row.update(
                    step_s=p.step_time_s, instrumented_s=p.instrumented_time_s,
                    overhead_x=p.instrumented_time_s / p.step_time_s, wall_s=wall,
                    step_cpu_s=p.step_cpu_time_s, instrumented_cpu_s=p.instrumented_cpu_time_s,
                    overhead_cpu_x=p.instrumented_cpu_time_s / p.step_cpu_time_s,
                    flops_total=p.flops_total, flops_forward=p.flops_forward,
                    flops_backward=p.flops_backward, flops_optimizer=p.flops_optimizer,
                    flops_torch=p.flops_torch, torch_over_ours=p.flops_torch / p.flops_total,
                    memory_peak=p.memory_peak, trainable_params=p.trainable_params,
                )
                if method == "full":
                    # fvcore counts the forward only; run it on the trained-for-a-step model.
                    row["flops_forward_fvcore"] = fvcore_forward_flops(model, x)["total"]
                rows.append(row)
                if verbose and "flops_forward_fvcore" in row:
                    print(f"{'':<13}forward FLOPs: ours {p.flops_forward / 1e6:.1f} M, fvcore "
                          f"{row['flops_forward_fvcore'] / 1e6:.1f} M (2 x its MACs)")
                if verbose:
                    print(f"{model_name:<13}{method:<7}{rank:>5} {p.step_time_s * 1e3:>8.1f} "
                          f"{p.instrumented_time_s * 1e3:>9.1f} {row['overhead_x']:>7.2f} "
                          f"{row['overhead_cpu_x']:>6.2f} "
                          f"{wall:>7.2f} {p.flops_total / 1e6:>10.1f} {p.flops_torch / 1e6:>10.1f}"
                          f" {row['torch_over_ours']:>10.2f} {p.memory_peak / 2**20:>9.1f}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profiler_overhead",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"ranks {QUICK_RANKS} only")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed updates per configuration")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: spinning OpenMP threads make timings on a busy "
                         "machine meaningless)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the updates run (cuda: the current GPU)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: error: --device cuda: no CUDA device is available here "
                f"(torch {torch.__version__}); use --device cpu\n")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.models, args.methods, QUICK_RANKS if args.quick else RANKS,
               batch=args.batch, resolution=args.resolution, repeat=args.repeat,
               device=args.device)
    total = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]
    if ok:
        for key, label in (("overhead_x", "wall"), ("overhead_cpu_x", "CPU time")):
            ratios = sorted(r[key] for r in ok)
            print(f"instrumented/plain step ({label}): median {ratios[len(ratios) // 2]:.2f}x, "
                  f"max {ratios[-1]:.2f}x over {len(ok)} configurations")
    print(f"total wall time {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
