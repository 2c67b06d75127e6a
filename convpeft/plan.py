"""Command line: will fine-tuning this model fit on my device? The largest batch per method.

    python -m convpeft.plan --model mobilenet_v2 --resolution 224 --budget 512MiB \\
        [--methods full,lora --ranks 4,8] [--lean [on|both]] [--checkpoint [on|both]] \\
        [--bn freeze] [--optimizer sgdm] [--device cpu|cuda] [--verify] \\
        [--batch 32] [--max-batch 4096] [--json] [--plot max_batch.png]
    python -m convpeft.plan --calibrate [--device cpu|cuda]

For every configuration (method, rank, lean, checkpointed) it prints the largest batch whose
update fits the budget, the predicted device peak and what is live at that moment (kernel
scratch included), FLOPs per image and trainable parameters, best first; ``--batch N`` says
fits / does not fit at batch ``N`` instead. All of it is predicted from shapes on meta tensors
(:mod:`convpeft.planner.search` explains the search, :mod:`convpeft.planner.budget` the budget
units, :mod:`convpeft.profiler.scratch` the device model), so it takes seconds per
configuration whatever the model and batch size. ``--verify`` then runs real updates on the
device at each planned batch and the next (:mod:`convpeft.planner.verify`); ``--calibrate``
fits the device model to this machine and caches it (:func:`convpeft.calibrate`).

This module is also what ``convpeft.plan`` is: ``convpeft.plan(model, budget, ...)`` calls
:func:`convpeft.planner.plan`. A package cannot hold both a function and a submodule named
``plan`` (importing the submodule rebinds the package attribute to it), so the package imports
this module and the module is callable: the name means the same object however it was
imported, and the planning itself lives in :mod:`convpeft.planner`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convpeft.cli_args import HelpFormatter, blocks_list, csv_list, int_list
from convpeft.planner import (
    DEFAULT_MAX_BATCH,
    DEFAULT_RANKS,
    LEAN_CHOICES,
    OPTIMIZERS,
    PlanRow,
    format_plan,
    parse_budget,
    plan,
    plot_plan,
)

__all__ = ["PlanRow", "build_parser", "main", "plan"]


def build_parser() -> argparse.ArgumentParser:
    from convpeft.methods import BN_POLICIES, list_methods

    p = argparse.ArgumentParser(
        prog="python -m convpeft.plan",
        description="Largest batch whose fine-tuning update fits a memory budget, per "
        "configuration (method, rank, lean), predicted from shapes alone (analytic profile on "
        "meta tensors: no data, any model size). Defaults are the rank sweep's: adapters / "
        "GaLore on every conv, head trainable, BN in train mode, AdamW.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="mobilenet_v2",
                   help="torchvision classification model (convpeft.models.list_models())")
    p.add_argument("--resolution", type=int, default=224, help="input height = width")
    p.add_argument("--budget", default=None,
                   help="memory for one update: bytes, or a number with a unit: kB/MB/GB/TB = "
                   "powers of 1000 (K/M/G/T alone the same: 300M = 300,000,000 bytes), "
                   "KiB/MiB/GiB/TiB = powers of 1024 (512MiB = 536,870,912 bytes); required "
                   "unless --calibrate")
    p.add_argument("--methods", type=csv_list, default=None,
                   help=f"comma-separated methods from {','.join(list_methods())} "
                   "(default: all of them)")
    p.add_argument("--ranks", type=int_list, default=list(DEFAULT_RANKS),
                   help="comma-separated ranks for the ranked methods "
                   f"({','.join(list_methods(ranked=True))})")
    p.add_argument("--lean", nargs="?", const="on", default="off", choices=LEAN_CHOICES,
                   help="memory-lean activations (convpeft.lean_activations; exact): --lean = "
                   "on for every configuration, --lean both = plan each plain and lean")
    p.add_argument("--checkpoint", nargs="?", const="on", default="off", choices=LEAN_CHOICES,
                   help="checkpointed blocks (convpeft.checkpoint_blocks; exact, recomputes "
                   "each block's forward in backward): --checkpoint = on for every "
                   "configuration, --checkpoint both = plan each without and with")
    p.add_argument("--blocks", type=blocks_list, default=None,
                   help="sparse updates: comma-separated K values, each training only the last "
                   "K blocks of the backbone (convpeft.memory.sparse; the frozen prefix builds no "
                   "graph), 'all' = every layer, e.g. all,2,4 (default: all)")
    p.add_argument("--prefix-chunks", type=int_list, default=None,
                   help="comma-separated micro-batch counts for the frozen prefix of each K in "
                   "--blocks (exact; default: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device the peak is predicted for (kernel scratch included; see "
                   "--calibrate) and --verify runs on")
    p.add_argument("--verify", action="store_true",
                   help="run real updates on --device at each planned batch and the next one; "
                   "step down while the measured peak exceeds the budget (CUDA: "
                   "max_memory_reserved)")
    p.add_argument("--calibrate", action="store_true",
                   help="instead of planning: fit the device's scratch model with a few small "
                   "real updates on --device and cache it for this machine and torch version")
    p.add_argument("--bn", choices=BN_POLICIES, default="train",
                   help="batch-norm policy (convpeft.methods): train, freeze (eval-mode BN; lets "
                   "BN go lean), stats (AdaBN)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                   help="; ".join(f"{k}: {v}" for k, v in OPTIMIZERS.items())
                   + ". galore always uses its own projected AdamW")
    p.add_argument("--batch", type=int, default=None,
                   help="instead of searching: does the update at this batch fit?")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="largest batch the search tries")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs")
    p.add_argument("--small-input", action="store_true",
                   help="CIFAR-style stem (convpeft.models.build_model small_input)")
    p.add_argument("--json", action="store_true",
                   help='print {"rows": [...]} (one object per configuration, best first)')
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="also draw max batch against rank per method (png, svg, pdf, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _check_plot(path: str | None, batch: int | None) -> None:
    """Refuse, before planning anything, a plot that could not be written."""
    if path is None:
        return
    if batch is not None:
        raise ValueError("--plot draws the max batch per rank; it cannot go with --batch")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"--plot {path}: unknown figure format {fmt or '(no suffix)'!r}; end "
                         f"the name with one of {', '.join('.' + f for f in sorted(formats))}")
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise ValueError(f"--plot {path}: folder {folder} does not exist; create it first")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)

    def progress(i: int, total: int, row: PlanRow) -> None:
        what = (("fits" if row.fits else "does not fit") if row.max_batch is None
                else f"max batch {row.max_batch}")
        print(f"[{i}/{total}] {row.label}: {what} ({row.evaluations} analytic profiles)",
              file=sys.stderr, flush=True)

    if a.calibrate:
        return _calibrate(parser, a.device)
    try:
        if a.budget is None:
            raise ValueError("--budget is required (e.g. --budget 512MiB), unless --calibrate")
        budget = parse_budget(a.budget)
        _check_plot(a.plot, a.batch)
        for flag in ("resolution", "batch", "max_batch", "num_classes"):
            v = getattr(a, flag)
            if v is not None and v < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {v})")
        rows = plan(a.model, budget, resolution=a.resolution, methods=a.methods, ranks=a.ranks,
                    lean=a.lean, bn=a.bn, optimizer=a.optimizer, batch=a.batch,
                    max_batch=a.max_batch, num_classes=a.num_classes,
                    small_input=a.small_input, progress=None if a.quiet else progress,
                    device=a.device, checkpoint=a.checkpoint, verify=a.verify,
                    blocks=a.blocks, prefix_chunks=a.prefix_chunks)
        if a.plot is not None:
            plot_plan(rows, a.plot)
    except (ValueError, TypeError) as e:  # one line, exit 2 (argparse's usage block buries it)
        parser.exit(2, f"{parser.prog}: error: {(str(e) or type(e).__name__).splitlines()[0]}\n")
    if a.json:
        print(json.dumps({"rows": [r.to_dict() for r in rows]}, indent=1))
    else:
        print(format_plan(rows))
        if a.plot is not None:
            print(f"plot: {a.plot}")
    return 0


def _calibrate(parser: argparse.ArgumentParser, device: str) -> int:
    from convpeft.profiler.calibrate import calibrate

    try:
        c = calibrate(device)
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {str(e).splitlines()[0]}\n")
    print(f"scratch model for {device}: {c.model.source}; block {c.model.block}; cached at "
          f"{c.path}")
    for r in c.rows:
        print(f"  {r['config']:<40} measured {r['measured'] / 2**20:8.1f} MiB  predicted "
              f"{r['predicted'] / 2**20:8.1f} MiB  ({r['error']:+.2%})")
    return 0


class _CallableModule(types.ModuleType):
    """This module's type: calling it calls :func:`convpeft.planner.plan`."""

    def __call__(self, *args: Any, **kwargs: Any) -> list[PlanRow]:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
