"""Compiled vs eager training steps of adapted models, ratios measured in one run.

    python -m benchmarks.compile_speed                  # MobileNetV2 + ResNet18, 8 x 64x64, CPU
    python -m benchmarks.compile_speed --device cuda    # the same on the GPU (skipped without one)
    python -m benchmarks.compile_speed --quick          # a smoke run (fewer steps)

Setup: torchvision MobileNetV2 and ResNet18 (``num_classes=10``, random init, seed 0), set up
by :func:`convpeft.methods.prepare` as the rank sweep does (adapters on every conv, r = 8, head
trainable, BN in train mode, AdamW): LoRA, LoRA lean (:func:`convpeft.lean_activations`), DoRA
and LoRA + checkpointed blocks (:func:`convpeft.checkpoint_blocks`); ``--configs full`` adds
plain full fine-tuning, what the compiler gains on the bare model. For each, two copies of the
same prepared model: one run eagerly, one wrapped by ``torch.compile(model)`` (inductor unless
``--backend``; ``--mode`` passes a compile mode). A step is forward, cross-entropy, backward,
AdamW step and ``zero_grad`` (the optimizer step stays eager on both sides).

Compile time: the wall time of the compiled copy's first steps (``--warmup``; a recompile in a
later step would land there too), reported apart from the steady state. Frames and graph breaks:
``torch._dynamo.utils.counters`` over every compiled step of that configuration (Dynamo reset
before it): ``frames`` the graphs Dynamo compiled (1 = one compilation, no recompile, no
break), ``graph_breaks`` the breaks it recorded.

Time: median wall time of steady-state steps, eager and compiled stepped alternately (the
order flipping every step), so load from other processes hits both alike; ``ratio`` is
compiled / eager (< 1: compiled is faster). On CUDA every step is bracketed by
``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import write_json
from convpeft.methods import MethodConfig, PreparedMethod, prepare

CONFIGS: dict[str, Callable[[], MethodConfig]] = {
    "lora": lambda: MethodConfig("lora", rank=8),
    "lora-lean": lambda: MethodConfig("lora", rank=8, lean=True),
    "dora": lambda: MethodConfig("dora", rank=8),
    "lora-ckpt": lambda: MethodConfig("lora", rank=8, checkpoint=True),
    # plain full fine-tuning (no convpeft Function in the graph): what the compiler gains on
    # the bare model, for reading the adapters' ratios against; not in the default set
    "full": lambda: MethodConfig("full"),
}
DEFAULT_CONFIGS = ("lora", "lora-lean", "dora", "lora-ckpt")
# The target: compiled / eager step time on the CPU at most this, for these configs.
TARGET = 1.0
TARGET_CONFIGS = ("lora", "lora-lean")


@dataclass
class Row:
    model: str
    config: str
    device: str
    backend: str
    mode: str
    batch: int
    size: int
    eager_s: float  # median steady-state step, eager
    compiled_s: float  # median steady-state step, compiled
    ratio: float  # compiled_s / eager_s (< 1: compiled faster)
    compile_s: float  # wall time of the compiled copy's warm-up steps (compilation included)
    eager_warmup_s: float  # wall time of the eager copy's warm-up steps, for comparison
    frames: int  # graphs Dynamo compiled over every compiled step (1: compiled once)
    graph_breaks: int
    steps: int
    target: float | None = None  # the bar on ratio, for LoRA / LoRA lean on the CPU
    meets_target: bool | None = None


def _build(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


class _Runner:
    """One prepared model stepping on one fixed batch; ``model`` may be a compiled wrapper."""

    def __init__(self, prepared: PreparedMethod, model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> None:
        self.prepared, self.model, self.x, self.y = prepared, model, x, y
        self.times: list[float] = []
        self.cuda = x.is_cuda

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.prepared.optimizer.step()
        self.prepared.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _prepared(base: nn.Module, config: str, device: torch.device) -> PreparedMethod:
    p = prepare(copy.deepcopy(base).to(device), CONFIGS[config]())
    p.train_mode()
    return p


def measure(name: str, config: str, *, device: str = "cpu", batch: int = 8, size: int = 64,
            steps: int = 20, warmup: int = 3, backend: str = "inductor",
            mode: str | None = None) -> Row:
    """Time ``config`` on torchvision ``name``: eager vs compiled, one :class:`Row`."""
    from torch._dynamo.utils import counters

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    base = _build(name)
    eager_p, comp_p = _prepared(base, config, dev), _prepared(base, config, dev)
    torch._dynamo.reset()
    counters.clear()
    eager = _Runner(eager_p, eager_p.model, x, y)
    compiled = _Runner(comp_p, torch.compile(comp_p.model, backend=backend, mode=mode), x, y)
    compile_s = sum(compiled.step() for _ in range(warmup))
    eager_warmup_s = sum(eager.step() for _ in range(warmup))
    for i in range(steps):  # alternate, the order flipping each step
        pair = (eager, compiled) if i % 2 == 0 else (compiled, eager)
        for r in pair:
            r.times.append(r.step())
    frames = int(counters["stats"]["unique_graphs"])
    breaks = int(sum(counters["graph_break"].values()))
    e, c = statistics.median(eager.times), statistics.median(compiled.times)
    row = Row(model=name, config=config, device=str(dev), backend=backend, mode=mode or "default",
              batch=batch, size=size, eager_s=e, compiled_s=c, ratio=c / e, compile_s=compile_s,
              eager_warmup_s=eager_warmup_s, frames=frames, graph_breaks=breaks, steps=steps)
    if dev.type == "cpu" and config in TARGET_CONFIGS:
        row.target, row.meets_target = TARGET, row.ratio <= TARGET
    torch._dynamo.reset()
    return row


def run(models: Sequence[str] = ("mobilenet_v2", "resnet18"),
        configs: Sequence[str] = DEFAULT_CONFIGS, **kw) -> list[Row]:
    """:func:`measure` every configuration on every model (keywords passed on)."""
    return [measure(m, c, **kw) for m in models for c in configs]


def format_rows(rows: Sequence[Row]) -> str:
    lines = [f"{'model':<13} {'config':<10} {'eager s':>8} {'compiled s':>10} {'ratio':>6} "
             f"{'compile s':>9} {'frames':>6} {'breaks':>6}  target"]
    for r in rows:
        verdict = "" if r.target is None else (
            f"<= {r.target:.2f} {'ok' if r.meets_target else 'MISSED'}")
        lines.append(f"{r.model:<13} {r.config:<10} {r.eager_s:8.4f} {r.compiled_s:10.4f} "
                     f"{r.ratio:6.3f} {r.compile_s:9.1f} {r.frames:>6} {r.graph_breaks:>6}  "
                     f"{verdict}")
    return "\n".join(lines)


def _set_inductor(settings: Sequence[str]) -> None:
    """Apply ``KEY=VALUE`` settings to ``torch._inductor.config`` (an unknown key is refused
    by the config itself, naming it)."""
    import ast

    import torch._inductor.config as inductor_config

    for kv in settings:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--inductor takes KEY=VALUE (got {kv!r})")
        setattr(inductor_config, key, ast.literal_eval(value))


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compile_speed",
        description="Training-step time of torch.compile'd vs eager adapted models (LoRA, LoRA "
                    "lean, DoRA, LoRA + checkpointing; MobileNetV2 and ResNet18, batch 8 x 64x64),"
                    " compiled/eager ratios from one run, compile time and graph breaks.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 timed steps, 1 warm-up")
    p.add_argument("--steps", type=int, default=20, help="timed steps per copy (median)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed first steps (the compiled copy's are its compile time)")
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"],
                   help="torchvision model names")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS),
                   help="what to time (default: %(default)s; full: plain full fine-tuning, the "
                        "reference without convpeft's Functions)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--device", default="cpu", help="cpu or cuda (skipped where no GPU)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--mode", default=None,
                   help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (a Python literal), e.g. "
                        "layout_optimization=False; repeatable")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: --device cuda, but no CUDA device is available here")
        return []
    _set_inductor(a.inductor)
    torch.set_num_threads(a.threads)
    steps, warmup = (3, 1) if a.quick else (a.steps, a.warmup)
    rows = run(a.models, a.configs, device=a.device, batch=a.batch, size=a.size, steps=steps,
               warmup=warmup, backend=a.backend, mode=a.mode)
    print(f"torch {torch.__version__}, {a.device}, batch {a.batch} x {a.size}x{a.size}, "
          f"backend {a.backend}, mode {a.mode or 'default'}"
          + "".join(f", {kv}" for kv in a.inductor) + "; ratio = compiled / eager "
          f"(median of {steps} steps each, interleaved)")
    print(format_rows(rows))
    write_json(a.json, [asdict(r) for r in rows])
    return rows


if __name__ == "__main__":
    main()
