"""onnxruntime CPU latency of the base model vs the LoRA model exported merged and unmerged.

    python -m benchmarks.onnx_latency                 # MobileNetV2 and ResNet18, 1x3x224x224
    python -m benchmarks.onnx_latency --runs 20 --resolution 112

Setup: torchvision MobileNetV2 and ResNet18 (``weights=None``, ``num_classes=10``), LoRA r=8 on
every conv (``apply_adapters(model, "lora", rank=8, target="conv")``, depthwise included) with
random ``B`` (a trained adapter; zero ``B`` would make the variants numerically identical).
Three ONNX files per model, written by :func:`convpeft.export_onnx` (each checked against
PyTorch with onnxruntime, relative error <= 1e-4):

* ``base``: the model without adapters;
* ``merged``: adapters folded in (``merge=True``): the base graph with other weights;
* ``unmerged``: adapters kept (``merge=False``), computed in activation space
  (``mode="activation"``: ``x -> conv_A -> conv_B`` beside each frozen conv, as peft runs them).

Latency: one onnxruntime ``InferenceSession`` per file (CPU provider, ``--threads`` intra-op
threads, full graph optimisation), ``--warmup`` runs, then ``--runs`` rounds in which every
variant runs once (round-robin, the order rotated each round, so load from other processes and
cache effects hit all alike); reported is the
median per variant and its ratio to ``base`` of the same model in the same run, next to the
graph's ``Conv`` node count and its ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from convpeft import apply_adapters, check_onnx, export_onnx, onnx_op_counts
from convpeft.adapters import adapter_layers

VARIANTS = ("base", "merged", "unmerged")


@dataclass
class Row:
    """One (model, variant): graph size, onnxruntime median latency and its check."""

    model: str
    variant: str
    conv_nodes: int
    nodes: int
    median_ms: float
    max_rel_error: float
    conv_ratio: float = 1.0
    latency_ratio: float = 1.0


def lora_model(build: Callable[[], nn.Module], rank: int, seed: int = 0) -> nn.Module:
    """``build()`` with LoRA of rank ``rank`` on every conv (activation space), random ``B``."""
    torch.manual_seed(seed)
    m = build()
    apply_adapters(m, "lora", rank=rank, target="conv", mode="activation")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in adapter_layers(m):
            layer.lora_B.normal_(0.0, 0.01, generator=g)
    return m.eval()


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(name: str, build: Callable[[], nn.Module], x: torch.Tensor, *, runs: int = 50,
            warmup: int = 5, rank: int = 8, threads: int = 2) -> list[Row]:
    """Export base / merged / unmerged ``build()`` for input ``x`` (N, C, H, W) and time them
    round-robin; rows in :data:`VARIANTS` order with ratios against ``base``."""
    torch.manual_seed(0)
    base = build().eval()
    adapted = lora_model(build, rank)
    rows, sessions = [], []
    with tempfile.TemporaryDirectory() as d:
        for variant in VARIANTS:
            model = base if variant == "base" else adapted
            merge = variant != "unmerged"
            path = export_onnx(model, Path(d) / f"{variant}.onnx", x, merge=merge)
            counts = onnx_op_counts(path)
            rows.append(Row(name, variant, counts.get("Conv", 0), sum(counts.values()), 0.0,
                            check_onnx(path, model, x, merge=merge)))
            sessions.append(_session(path, threads))
        feed = x.numpy()
        feeds = [{s.get_inputs()[0].name: feed} for s in sessions]
        times: list[list[float]] = [[] for _ in sessions]
        n = len(sessions)
        for i in range(warmup + runs):
            for j in [(i + k) % n for k in range(n)]:  # rotate who goes first each round
                t0 = time.perf_counter()
                sessions[j].run(None, feeds[j])
                if i >= warmup:
                    times[j].append(time.perf_counter() - t0)
    for row, t in zip(rows, times, strict=True):
        row.median_ms = 1e3 * statistics.median(t)
        row.conv_ratio = row.conv_nodes / rows[0].conv_nodes
        row.latency_ratio = row.median_ms / rows[0].median_ms
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table of the rows (ratios against each model's ``base``)."""
    lines = ["| model | variant | Conv nodes | all nodes | median latency | max rel. error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.variant} | {r.conv_nodes} ({r.conv_ratio:.2f}x) | "
                     f"{r.nodes} | {r.median_ms:.2f} ms ({r.latency_ratio:.2f}x) | "
                     f"{r.max_rel_error:.1e} |")
    return "\n".join(lines)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    import torchvision

    fn = getattr(torchvision.models, name)
    return lambda: fn(weights=None, num_classes=10)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.onnx_latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,resnet18",
                    help="comma-separated torchvision model names (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    ap.add_argument("--resolution", type=int, default=224,
                    help="input height and width (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=50,
                    help="timed rounds; the median is reported (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed rounds first (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2,
                    help="onnxruntime intra-op threads (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args(argv)
    import torchvision

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if not callable(getattr(torchvision.models, n, None))]
    if unknown or not names:
        ap.error(f"unknown torchvision model(s) {unknown}; e.g. --models mobilenet_v2,resnet18")
    for flag in ("batch", "resolution", "rank", "runs", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1")
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution,
                    generator=torch.Generator().manual_seed(0))
    rows: list[Row] = []
    for name in names:
        rows += measure(name, _torchvision(name), x, runs=args.runs, warmup=max(args.warmup, 0),
                        rank=args.rank, threads=args.threads)
    print(f"onnxruntime CPU, {args.threads} threads, input {tuple(x.shape)}, LoRA r={args.rank} "
          f"on every conv, median of {args.runs} runs; ratios vs base")
    print(format_table(rows))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
