"""Command line: what one training update of a model + PEFT method costs.

    python -m convpeft.profiler --model mobilenet_v2 --method lora --rank 8 --batch 32 \\
        --resolution 64 [--json] [--analytic] [--per-layer] [--amp bf16]

Builds the model (:func:`convpeft.models.build_model`, random init unless ``--weights``), sets
the method up (:func:`convpeft.methods.prepare`), and profiles one update on a random batch with
:func:`convpeft.profiler.profile_update` -- or, with ``--analytic``, predicts it from shapes
alone (:func:`convpeft.profiler.analytic_profile`: no compute, any batch size and resolution).
``--amp bf16|fp16`` profiles the update under ``torch.autocast`` (fp16 on CUDA only; not with
``--analytic``).
Prints a breakdown table (FLOPs split, memory by category, time) or, with ``--json``, one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from convpeft.core.amp import AMP_MODES, check_amp
from convpeft.methods import BN_POLICIES, get_method, list_methods
from convpeft.profiler import analytic_profile, format_profile, profile_update


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before building anything, what would fail later or silently profile nothing."""
    for name in ("batch", "resolution", "rank", "repeat", "num_classes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 "
                             f"(got {getattr(args, name)})")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0 (got {args.warmup})")
    if not -(2**63) <= args.seed < 2**64:
        raise ValueError(f"--seed must be between -2**63 and 2**64 - 1 (torch's seed is 64 "
                         f"bits; got {args.seed}); e.g. --seed 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: only cpu and cuda are supported")
    check_amp(args.amp, device)
    if args.analytic and args.amp != "off":
        raise ValueError(f"--amp {args.amp} with --analytic: the analytic profile traces shapes "
                         "on the meta device, which has no autocast; drop one of the two")
    w = args.weights
    if w is not None and (os.sep in w or w.endswith((".pt", ".pth", ".safetensors"))) \
            and not os.path.isfile(w):
        raise ValueError(f"--weights {w}: no such file")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m convpeft.profiler",
        description="Profile ONE training update (FLOPs by pass, peak memory by category, time).")
    ap.add_argument("--model", default="mobilenet_v2", help="backbone (convpeft.models)")
    ap.add_argument("--method", default="lora", choices=list_methods())
    ap.add_argument("--rank", type=int, default=8, help="LoRA/DoRA/GaLore rank")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=64, help="input H = W")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--weights", default=None, help="pretrained weights name/path (build_model)")
    ap.add_argument("--small-input", action="store_true", help="CIFAR-style stem")
    ap.add_argument("--bn", default="train", choices=BN_POLICIES)
    ap.add_argument("--target", default="conv", help="layers adapted/projected")
    ap.add_argument("--lean", action="store_true",
                    help="memory-lean activations (convpeft.lean_activations; exact)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="activation checkpointing of the backbone's blocks "
                    "(convpeft.checkpoint_blocks; exact; recomputes their forward)")
    ap.add_argument("--update-blocks", type=int, default=None, metavar="K",
                    help="train only the last K backbone blocks; the frozen prefix runs without "
                    "a graph (convpeft.memory.sparse)")
    ap.add_argument("--prefix-chunks", type=int, default=1, metavar="N",
                    help="with --update-blocks: run the frozen prefix in N micro-batches (exact)")
    ap.add_argument("--update-proj-gap", type=int, default=200, help="GaLore refresh period")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="timed updates")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=AMP_MODES, default="off",
                    help="mixed precision: forward + loss under torch.autocast in bf16 (CPU or "
                    "CUDA) or fp16 (CUDA only); fp32 master weights")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed (-2**63 to 2**64 - 1)")
    ap.add_argument("--analytic", action="store_true", help="shapes only: no data, no compute")
    ap.add_argument("--per-layer", action="store_true", help="add per-layer FLOP rows")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip torch's FlopCounterMode comparison")
    ap.add_argument("--tensor-level", action="store_true",
                    help="CPU: skip the allocator trace; the peak is then the tensor-level one "
                    "(what ops return, without kernel scratch), a little faster")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def prepare_model(args: argparse.Namespace):
    """(model, optimizer) for the CLI arguments, via convpeft.models + convpeft.methods."""
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model
    from convpeft.optim import GaLoreSettings

    model = build_model(args.model, args.num_classes, weights=args.weights,
                        small_input=args.small_input)
    galore = GaLoreSettings(update_proj_gap=args.update_proj_gap)
    cfg = MethodConfig(args.method, rank=args.rank, bn=args.bn, target=args.target,
                       lean=args.lean, checkpoint=args.checkpoint,
                       galore=galore if args.method == "galore" else None,
                       update_blocks=args.update_blocks, prefix_chunks=args.prefix_chunks)
    prep = prepare(model, cfg)
    prep.model.to(args.device)
    prep.train_mode()
    return prep.model, prep.optimizer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        torch.manual_seed(args.seed)
        model, optimizer = prepare_model(args)
        shape = (args.batch, 3, args.resolution, args.resolution)
        if args.analytic:
            # the device peak predicted for --device (tensor-level alone with --tensor-level)
            prof = analytic_profile(model, optimizer, shape, warmup=args.warmup,
                                    per_layer=args.per_layer, compare_torch=not args.no_torch,
                                    device=None if args.tensor_level
                                    else torch.device(args.device).type)
        else:
            x = torch.randn(shape, device=args.device)
            y = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
            prof = profile_update(model, optimizer, x, y, warmup=args.warmup, repeat=args.repeat,
                                  per_layer=args.per_layer, compare_torch=not args.no_torch,
                                  allocator_peak=False if args.tensor_level else None,
                                  amp=args.amp)
    except (ValueError, TypeError, KeyError, OSError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if what.startswith("the model failed on a batch"):  # name the flags that set it
            what += f" (--model {args.model} --resolution {args.resolution}: try another)"
        elif what.startswith("the model returned"):
            what += f" (--model {args.model})"
        print(f"error: {what}", file=sys.stderr)
        return 2
    if args.json:
        out = {"model": args.model, "method": args.method, "rank": args.rank, **prof.to_dict()}
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model} + {args.method}"
              + (f" (rank {args.rank})" if get_method(args.method).ranked else ""))
        print(format_profile(prof))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
