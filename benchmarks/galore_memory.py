"""GaLore vs plain AdamW full fine-tuning: optimizer-state bytes and step time on edge CNNs.

For torchvision MobileNetV2 and ResNet18 (``num_classes=10``, 64x64 inputs) this builds, in one
run and on the same batch, plain ``torch.optim.AdamW`` over all parameters (the full fine-tuning
baseline), galore-torch's AdamW without projection (the same per-parameter update loop GaLore
runs, to separate projection cost from implementation cost), and
:func:`convpeft.optim.galore_optimizer` (``target="conv"``) at each rank. It reports

* ``state_bytes``: every optimizer-state storage after the first steps (moments, projections,
  step counters), and its ratio to AdamW's;
* ``opt_step_s``: median time of ``optimizer.step()`` alone on an ordinary (non-refresh) step;
  ``update_s``: median of the whole update (forward + backward + step); ``refresh_step_s``: the
  first ``step()``, which runs every projection's SVD; ratios of the medians to AdamW's;
* which targeted layers GaLore saves nothing on (``rank >= min(matrix side)``: fallback to AdamW).

Run: ``python -m benchmarks.galore_memory`` (``--quick`` for a smoke run, ``--help`` for more).
Timings are CPU wall-clock medians over ``--repeat`` round-robin passes through all configs (so
load changes on a shared machine hit every config alike); they are still noisy under load.
``SVD GFLOP``: one refresh of all projections (``projection_refresh_flops``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

from benchmarks.common import write_json
from convpeft.profiler.memory import state_bytes

MODELS = ("mobilenet_v2", "resnet18")
RANKS = (1, 2, 4, 8, 16, 32, 64)


def build_model(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A randomly initialized torchvision model (no weights are downloaded)."""
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor storage in ``opt.state`` (each counted once)."""
    return state_bytes(opt)


def _timed_update(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """One update; returns (seconds of ``opt.step()``, seconds of the whole update)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t2 - t1, t2 - t0


def _fallback_text(summary: Any) -> str:
    """Fallback layers compactly, by kind: count and their smaller matrix sides."""
    by_kind: dict[str, list[int]] = {}
    for r in summary.rows:
        if r.role == "fallback":
            by_kind.setdefault(r.kind or "?", []).append(min(r.matrix_shape))
    if not by_kind:
        return "-"
    parts = []
    for kind, sides in by_kind.items():
        lo, hi = min(sides), max(sides)
        parts.append(f"{len(sides)} {kind} (min side {lo}{'' if lo == hi else f'-{hi}'})")
    return ", ".join(parts)


def fallback_report(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per model, the layers that become fallback (GaLore saves nothing) as the rank grows."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        prev: set[str] = set()
        for r in (r for r in rows if r["model"] == model and r["method"] == "galore"):
            new = [n for n in r["fallback_layers"] if n not in prev]
            prev |= set(new)
            names = ", ".join(n.removesuffix(".weight") for n in new) if new else "none new"
            lines.append(f"{model} rank {r['rank']}: {len(r['fallback_layers'])} fallback; "
                         f"new: {names}")
    return lines


def run(
    models: Sequence[str] = MODELS,
    ranks: Sequence[int] = RANKS,
    *,
    batch: int = 32,
    resolution: int = 64,
    repeat: int = 5,
    threads: int = 2,
    lr: float = 1e-3,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """One row per (model, method, rank): state bytes, step times and ratios to AdamW.

    ``method`` is ``"adamw"`` (torch.optim.AdamW, all params), ``"adamw_galore_torch"``
    (galore-torch's AdamW, no projection) or ``"galore"``.
    """
    from convpeft.optim import galore_optimizer
    from convpeft.optim.upstream import GaLoreAdamW

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    rows: list[dict[str, Any]] = []
    for model_name in models:
        factories: list[tuple[str, int | None, Callable[[nn.Module], Any]]] = [
            ("adamw", None, lambda m: torch.optim.AdamW(m.parameters(), lr=lr)),
            ("adamw_galore_torch", None,
             lambda m: GaLoreAdamW(m.parameters(), lr=lr, no_deprecation_warning=True)),
        ]
        for r in ranks:
            # a huge gap: only the first step refreshes, so later steps are ordinary ones
            factories.append(("galore", r, lambda m, r=r: galore_optimizer(
                m, rank=r, lr=lr, update_proj_gap=10**9)))
        runs = []
        for method, rank, make in factories:
            model = build_model(model_name)
            model.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "nothing is projected"
                opt = make(model)
            # the first step allocates state and, for GaLore, runs every projection's SVD
            first, _ = _timed_update(model, opt, x, y)
            runs.append((method, rank, model, opt, first, [], []))
        # round-robin over the configs, so load changes on a shared machine hit all alike
        for _ in range(repeat):
            for _m, _r, model, opt, _f, steps, updates in runs:
                step_s, update_s = _timed_update(model, opt, x, y)
                steps.append(step_s)
                updates.append(update_s)
        base: dict[str, float] = {}
        for method, rank, model, opt, first, steps, updates in runs:
            row: dict[str, Any] = {
                "model": model_name, "method": method, "rank": rank,
                "params": sum(p.numel() for p in model.parameters()),
                "state_bytes": optimizer_state_bytes(opt),
                "opt_step_s": statistics.median(steps),
                "update_s": statistics.median(updates),
                "refresh_step_s": first,
            }
            if method == "galore":
                s = opt.summary()
                row.update({
                    "projected": len(s.projected), "fallback": len(s.fallback),
                    "fallback_layers": s.fallback, "fallback_text": _fallback_text(s),
                    "summary_state_bytes": s.state_bytes,
                    "refresh_flops": opt.projection_refresh_flops(),
                    "projection_step_flops": opt.step_flops(),
                })
            if method == "adamw":
                base = {k: row[k] for k in ("state_bytes", "opt_step_s", "update_s")}
            row["state_ratio"] = row["state_bytes"] / base["state_bytes"]
            row["opt_step_ratio"] = row["opt_step_s"] / base["opt_step_s"]
            row["update_ratio"] = row["update_s"] / base["update_s"]
            rows.append(row)
            if log:
                log(_format_row(row))
        del runs
    return rows


_HEADER = (f"{'model':<13} {'method':<19} {'rank':>4} {'state MiB':>9} {'state/AdamW':>11} "
           f"{'step ms':>8} {'step/AdamW':>10} {'update ms':>9} {'upd/AdamW':>9} "
           f"{'1st step ms':>11} {'proj':>4} {'fb':>3} {'SVD GFLOP':>9}  "
           "fallback (GaLore saves nothing)")


def _format_row(r: dict[str, Any]) -> str:
    svd = f"{r['refresh_flops'] / 1e9:.2f}" if "refresh_flops" in r else "-"
    return (f"{r['model']:<13} {r['method']:<19} {r['rank'] if r['rank'] else '-':>4} "
            f"{r['state_bytes'] / 2**20:>9.2f} {r['state_ratio']:>11.3f} "
            f"{r['opt_step_s'] * 1e3:>8.1f} {r['opt_step_ratio']:>10.2f} "
            f"{r['update_s'] * 1e3:>9.1f} {r['update_ratio']:>9.2f} "
            f"{r['refresh_step_s'] * 1e3:>11.1f} {r.get('projected', '-'):>4} "
            f"{r.get('fallback', '-'):>3} {svd:>9}  {r.get('fallback_text', '')}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.galore_memory",
        description="GaLore (conv-aware, on galore-torch) vs plain AdamW full fine-tuning: "
                    "optimizer-state bytes and step time on MobileNetV2 and ResNet18.")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ranks", nargs="+", type=int, default=None,
                    help=f"default {' '.join(map(str, RANKS))}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5, help="timed ordinary steps (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: ranks 4 and 64, batch 8, 32x32, 2 timed steps")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks = args.ranks or [4, 64]
        args.batch, args.resolution, args.repeat = 8, 32, 2
    args.ranks = args.ranks or list(RANKS)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}, {args.repeat} timed steps (median)")
    print(_HEADER)
    rows = run(args.models, args.ranks, batch=args.batch, resolution=args.resolution,
               repeat=args.repeat, threads=args.threads)
    print("\nfallback layers (rank >= min matrix side, plain AdamW state, no saving):")
    for line in fallback_report(rows):
        print("  " + line)
    write_json(args.json, rows, indent=1)
    return rows


if __name__ == "__main__":
    main()
