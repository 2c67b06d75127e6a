"""convpeft's LoRA/DoRA vs peft's, side by side in one process: train-step time and peak memory.

    python -m benchmarks.adapter_speed            # full run (both models, 20 timed steps each)
    python -m benchmarks.adapter_speed --quick    # a fast smoke run (fewer steps)

Setup: torchvision MobileNetV2 and ResNet18 (``num_classes=10``, random init),
adapters on the ``groups == 1`` convs only (all peft can adapt), r = 8, alpha = 16, batch 32 of
64x64 images, AdamW (lr 1e-3) on the trainable parameters, cross-entropy, ``torch.set_num_threads
(2)``. Everything that is not an adapter is frozen on both sides (batch norm still in train mode).
Then our depthwise-inclusive configuration (``target="conv"``), which peft cannot run.

Time: median (and IQR) of the wall time of whole train steps (forward, backward, AdamW step,
``zero_grad``), after warm-up steps, and the median process CPU time of the same steps
(``time.process_time``; less sensitive to other processes on a shared machine, but it also counts
the OpenMP threads' spin-waiting). Ratios use wall time unless ``--clock cpu``. The
configurations are stepped round-robin, so load from other processes hits them all alike.

Peak memory: one extra step per configuration under the profiler's storage tracker
(:func:`convpeft.profiler.memory.tensor_peak`: every storage an aten op returns, released when its
storage object dies); the parameters, buffers, gradients, optimizer state and the batch that
exist at the start count as the baseline. Peak = the largest simultaneous sum of live storage
bytes during the step. The same method measures every configuration, peft's included; scratch
buffers a kernel allocates and frees internally are not seen by either side.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import convpeft
from convpeft.core.layer_kinds import select_layers
from convpeft.profiler.memory import tensor_peak

MIB = 2**20
# The bar, relative to peft's same method: (time ratio, memory ratio) must be <= these.
BARS = {"lora": (1.05, 1.00), "dora": (0.90, 0.85)}
# Earlier measurements of this setup on a 2-core CPU (seconds, MiB), for reference only.
REFERENCE = {
    ("mobilenet_v2", "full"): (0.231, 222.6), ("mobilenet_v2", "peft-lora"): (0.180, 211.2),
    ("mobilenet_v2", "peft-dora"): (0.248, 300.7), ("resnet18", "full"): (0.286, 318.1),
    ("resnet18", "peft-lora"): (0.184, 104.3), ("resnet18", "peft-dora"): (0.268, 180.6),
}


# ---- configurations ----------------------------------------------------------------------------
def _build(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


def _peft(model: nn.Module, use_dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in select_layers(model, "standard")]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=names,
                                            use_dora=use_dora))


def _ours(model: nn.Module, method: str, target: str) -> nn.Module:
    convpeft.apply_adapters(model, method, 8, alpha=16, target=target)
    return model


CONFIGS: dict[str, tuple[Callable[[nn.Module], nn.Module], str, str]] = {
    # label: (prepare, compared against, method)
    "full": (lambda m: m, "", "full"),
    "peft-lora": (lambda m: _peft(m, False), "", "lora"),
    "peft-dora": (lambda m: _peft(m, True), "", "dora"),
    "convpeft-lora": (lambda m: _ours(m, "lora", "standard"), "peft-lora", "lora"),
    "convpeft-dora": (lambda m: _ours(m, "dora", "standard"), "peft-dora", "dora"),
    "convpeft-lora-conv": (lambda m: _ours(m, "lora", "conv"), "", "lora"),
    "convpeft-dora-conv": (lambda m: _ours(m, "dora", "conv"), "", "dora"),
}


@dataclass
class Row:
    model: str
    config: str
    time_s: float
    time_iqr_s: float
    cpu_s: float
    peak_mib: float
    trainable_params: int
    time_ratio: float | None = None  # vs the peft configuration named in ``versus``
    mem_ratio: float | None = None
    versus: str = ""
    bar_time: float | None = None
    bar_mem: float | None = None
    passes: bool | None = None


class _Runner:
    def __init__(self, model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> None:
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.batch, self.labels = batch, labels
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.batch), self.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        self.step()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)

    def peak_bytes(self) -> int:
        existing = [p for p in self.model.parameters()] + list(self.model.buffers())
        existing += [t for s in self.opt.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor)]
        existing += [self.batch, self.labels]
        return tensor_peak(self.step, existing)


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def run(models: tuple[str, ...] = ("mobilenet_v2", "resnet18"), *, steps: int = 20,
        warmup: int = 3, batch: int = 32, size: int = 64, threads: int = 2,
        configs: tuple[str, ...] = tuple(CONFIGS), clock: str = "wall") -> list[Row]:
    """Measure every configuration on every model; returns one :class:`Row` each.

    ``clock`` ("wall" or "cpu") picks the time the ratios compare."""
    torch.set_num_threads(threads)
    rows: list[Row] = []
    for name in models:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        base = _build(name)
        runners = {c: _Runner(CONFIGS[c][0](copy.deepcopy(base)), x, y) for c in configs}
        for _ in range(warmup):
            for r in runners.values():
                r.step()
        for _ in range(steps):
            for r in runners.values():
                r.timed_step()
        by_cfg = {}
        for c, r in runners.items():
            row = Row(model=name, config=c, time_s=statistics.median(r.times),
                      time_iqr_s=_iqr(r.times), cpu_s=statistics.median(r.cpu_times),
                      peak_mib=r.peak_bytes() / MIB,
                      trainable_params=sum(p.numel() for p in r.params))
            by_cfg[c] = row
            rows.append(row)
        for c, row in by_cfg.items():
            versus, method = CONFIGS[c][1], CONFIGS[c][2]
            if versus and versus in by_cfg:
                ref = by_cfg[versus]
                row.versus = versus
                row.time_ratio = (row.cpu_s / ref.cpu_s if clock == "cpu"
                                  else row.time_s / ref.time_s)
                row.mem_ratio = row.peak_mib / ref.peak_mib
                row.bar_time, row.bar_mem = BARS[method]
                row.passes = row.time_ratio <= row.bar_time and row.mem_ratio <= row.bar_mem
        del runners
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'model':<13} {'config':<19} {'time s':>7} {'iqr':>6} {'cpu s':>6} {'peak MiB':>9} "
             f"{'trainable':>10}  {'vs':<10} {'time x':>6} {'mem x':>6}  bar"]
    for r in rows:
        ratio = ""
        if r.versus:
            verdict = "ok" if r.passes else "MISSED"
            ratio = (f"{r.versus:<10} {r.time_ratio:6.3f} {r.mem_ratio:6.3f}  "
                     f"<= {r.bar_time:.2f}/{r.bar_mem:.2f} {verdict}")
        ref = REFERENCE.get((r.model, r.config))
        note = f"   (issue: {ref[0]:.3f} s / {ref[1]:.1f} MiB)" if ref else ""
        lines.append(f"{r.model:<13} {r.config:<19} {r.time_s:7.3f} {r.time_iqr_s:6.3f} "
                     f"{r.cpu_s:6.3f} {r.peak_mib:9.1f} {r.trainable_params:>10,}  {ratio}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.adapter_speed",
        description="Train-step time and peak memory of convpeft's LoRA/DoRA vs peft's on "
                    "MobileNetV2 and ResNet18 (groups=1 convs, r=8, alpha=16, batch 32, 64x64, "
                    "AdamW, 2 threads), then convpeft's depthwise-inclusive configuration.",
    )
    p.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up (smoke run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"],
                   help="torchvision model names")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time the ratios compare: wall (default) or process CPU time")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    steps, warmup = (3, 1) if a.quick else (a.steps, a.warmup)
    rows = run(tuple(a.models), steps=steps, warmup=warmup, threads=a.threads,
               configs=tuple(a.configs), clock=a.clock)
    print(format_rows(rows))
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return rows


if __name__ == "__main__":
    main()
