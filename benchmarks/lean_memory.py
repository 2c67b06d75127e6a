"""Peak memory of one update: plain, memory-lean, checkpointed, and the floor under them.

``python -m benchmarks.lean_memory`` predicts with the analytic profiler (shapes only, no data)
the device peak of one AdamW update on the CPU (the tensors plus each op's oneDNN scratch, from the
shipped CPU scratch model of :mod:`convpeft.profiler.scratch`, so the figures are the same on
every machine; ``benchmarks.device_truth`` measures them) at batch 64 x 224x224 (``--batch``,
``--resolution``) for MobileNetV2 and ResNet18: full fine-tuning with BN in train mode (the
study's baseline), full FT with BN frozen, and head / LoRA / LoRA-FA / DoRA (r=8, every conv,
head trainable, BN frozen), each plain, lean (:func:`convpeft.lean_activations`) and lean +
checkpointed (:func:`convpeft.checkpoint_blocks`). Ratios are against the baseline of the same
run (and, ``vs BN frozen``, against full FT with BN frozen).

The floor (:func:`update_floor`) is what any exact update of that method must hold at once,
whatever it saves or recomputes: the resident state (parameters, buffers, optimizer state,
the batch) plus, at the worst layer ``L`` of backward, the gradient of ``L``'s output and of
its input (backward kernels read the one while writing the other) plus the parameter gradients
already computed by then (those of ``L`` and every layer after it); never less than the
resident state plus all parameter gradients (alive together when ``step`` starts), nor than
the resident state plus the largest input + output of one layer in forward (an in-place layer
counts once), which binds where little or nothing of the backbone trains (head only). It ignores
every saved activation (checkpointing could recompute them), a residual branch's pending
gradient and kernel scratch, so it is a lower bound, not a target one can reach exactly.
Each row's ``above floor`` is its peak over its method's floor.

``--measure`` also runs real updates of each at a small size (batch 8 x 64x64): the measured
peak (:func:`convpeft.profiler.profile_update`) next to the analytic one at that size, and for
each lean row the step-time ratio lean/plain of the same method, timed interleaved on one
model (lean, and checkpointing where the row has it, switched on and off between updates;
median CPU time, steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from convpeft.memory.checkpoint import checkpoint_blocks, restore_checkpointing
from convpeft.memory.lean import lean_activations, restore_activations
from convpeft.profiler import analytic_profile, profile_update
from convpeft.profiler.analytic import meta_copy
from convpeft.profiler.calibrate import prepared_update
from convpeft.profiler.memory import state_tensors
from convpeft.profiler.scratch import default_model

MiB = 2**20
CONFIGS = [  # (label, method, bn, lean, checkpointed)
    ("full FT, BN train (baseline)", "full", "train", False, False),
    ("full FT, BN frozen", "full", "freeze", False, False),
    ("full FT, BN train, ckpt", "full", "train", False, True),
    ("head only", "head", "freeze", False, False),
    ("head only, lean", "head", "freeze", True, False),
    ("LoRA", "lora", "freeze", False, False),
    ("LoRA, lean", "lora", "freeze", True, False),
    ("LoRA, lean + ckpt", "lora", "freeze", True, True),
    ("LoRA-FA", "lora-fa", "freeze", False, False),
    ("LoRA-FA, lean", "lora-fa", "freeze", True, False),
    ("LoRA-FA, lean + ckpt", "lora-fa", "freeze", True, True),
    ("DoRA", "dora", "freeze", False, False),
    ("DoRA, lean", "dora", "freeze", True, False),
    ("DoRA, lean + ckpt", "dora", "freeze", True, True),
]


def prepared(model_name: str, method: str, bn: str, lean: bool, rank: int,
             ckpt: bool = False, target: str = "conv"):
    """``model_name`` (ImageNet stem, 10 classes) prepared for ``method`` with adapters on the
    ``target`` layers (:mod:`convpeft.core.layer_kinds`), in train mode, lean/checkpointed if asked
    (:func:`convpeft.profiler.calibrate.prepared_update`)."""
    return prepared_update(model_name, method, bn, lean, ckpt, rank=rank, target=target)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def update_floor(model: nn.Module, optimizer: torch.optim.Optimizer,
                 input_shape: Sequence[int]) -> dict[str, int]:
    """The floor of one exact update (see the module docstring), from shapes: a forward of a
    meta copy records each layer's input/output sizes and whether they carry a gradient.

    Layers are the leaf modules, an adapter wrapper counting as one layer. Returns bytes:
    ``resident`` (params + buffers + optimizer state, after one warm-up step, + the batch),
    ``grads`` (all trainable parameters), ``forward_pair`` (the largest input + output of one
    layer in forward), ``pair`` and ``pair_layer`` (the binding layer's output + input
    gradients, or its forward input + output, marked ``(forward)``), and ``floor``."""
    m, opt = meta_copy(model, optimizer)
    x = torch.empty(tuple(input_shape), device="meta")
    y = torch.empty(input_shape[:1], dtype=torch.long, device="meta")
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()  # optimizer state as it is at the profiled update
    opt.zero_grad(set_to_none=True)
    layers = [(n, mod) for n, mod in m.named_modules() if hasattr(mod, "base_layer")
              or (not any(True for _ in mod.children()) and not any(
                  n.startswith(a + ".") for a, w in m.named_modules()
                  if a and hasattr(w, "base_layer")))]
    seen: list[tuple[str, int, int]] = []  # (name, pair bytes, own grad bytes), forward order
    fwd = [0, ""]  # the largest input + output of one layer in forward, and where

    def hook(name: str):
        def record(mod: nn.Module, args, out) -> None:
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            gin = sum(_nbytes(a) for a in ins if a.requires_grad)
            gout = _nbytes(out) if isinstance(out, torch.Tensor) and out.requires_grad else 0
            own = sum(_nbytes(p) for p in mod.parameters() if p.requires_grad)
            seen.append((name, gin + gout, own))
            if isinstance(out, torch.Tensor):  # an in-place op's output is its input
                both = sum(map(_nbytes, ins)) + (0 if any(out is a for a in ins)
                                                 else _nbytes(out))
                if both > fwd[0]:
                    fwd[:] = [both, name]
        return record

    handles = [mod.register_forward_hook(hook(n)) for n, mod in layers]
    try:
        with torch.enable_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    resident = (sum(_nbytes(p) for p in m.parameters()) + sum(_nbytes(b) for b in m.buffers())
                + sum(_nbytes(t) for t in state_tensors(opt)) + _nbytes(x) + _nbytes(y))
    grads = sum(_nbytes(p) for p in m.parameters() if p.requires_grad)
    best, best_pair, best_layer, after = 0, 0, "", 0
    for name, pair, own in reversed(seen):  # backward order: later layers' grads exist already
        after += own
        if pair + after > best:
            best, best_pair, best_layer = pair + after, pair, name
    if fwd[0] > max(best, grads):  # a forward transient is the binding one
        best_pair, best_layer = fwd[0], f"{fwd[1]} (forward)"
    return {"resident": resident, "grads": grads, "pair": best_pair, "pair_layer": best_layer,
            "forward_pair": fwd[0], "floor": resident + max(best, grads, fwd[0])}


def run(models: Sequence[str], batch: int, resolution: int, rank: int, measure: bool) -> list:
    rows = []
    shape = (batch, 3, resolution, resolution)
    for name in models:
        base = frozen = None
        floors: dict[str, dict] = {}
        for label, method, bn, lean, ckpt in CONFIGS:
            p = prepared(name, method, bn, lean, rank, ckpt)
            prof = analytic_profile(p.model, p.optimizer, shape, compare_torch=False,
                                    scratch=default_model("cpu"))
            base = base or prof.memory_peak
            if (method, bn) == ("full", "freeze"):
                frozen = prof.memory_peak
            if (method, bn) not in floors:
                floors[(method, bn)] = update_floor(p.model, p.optimizer, shape)
            floor = floors[(method, bn)]
            row = {"model": name, "config": label, "method": method, "bn": bn, "lean": lean,
                   "checkpoint": ckpt, "peak_mib": prof.memory_peak / MiB,
                   "tensors_mib": prof.memory_peak_tensors / MiB,
                   "peak_op": prof.memory_peak_op,
                   "ratio": prof.memory_peak / base,
                   "ratio_bn_frozen": prof.memory_peak / frozen if frozen else None,
                   "flops_total": prof.flops_total,
                   "activations_mib": prof.memory_by_category.get("activations", 0) / MiB,
                   "floor_mib": floor["floor"] / MiB, "floor_layer": floor["pair_layer"],
                   "above_floor": prof.memory_peak / floor["floor"]}
            if measure:
                row.update(_measure(name, method, bn, lean, rank, ckpt))
                if lean:
                    row["time_ratio"] = time_ratio(name, method, bn, rank, ckpt=ckpt)
            rows.append(row)
    return rows


def _update(model, optimizer, x, y) -> float:
    optimizer.zero_grad(set_to_none=True)
    c0 = time.process_time()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.process_time() - c0


def time_ratio(name: str, method: str, bn: str, rank: int, batch: int = 8,
               resolution: int = 64, rounds: int = 7, ckpt: bool = False) -> float:
    """Median CPU time of a lean (``ckpt``: and checkpointed) update over that of the plain
    update of the same prepared model, the two alternating (ABBA order) so that load on the
    machine hits both alike."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    p = prepared(name, method, bn, False, rank)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds + 1):
        for lean in ((False, True) if r % 2 else (True, False)):
            (lean_activations if lean else restore_activations)(p.model)
            if ckpt:
                (checkpoint_blocks if lean else restore_checkpointing)(p.model)
            t = _update(p.model, p.optimizer, x, y)
            if r:  # round 0 warms up both
                times[lean].append(t)
    return statistics.median(times[True]) / statistics.median(times[False])


def _measure(name, method, bn, lean, rank, ckpt=False, batch=8, resolution=64) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    p = prepared(name, method, bn, lean, rank, ckpt)
    a = analytic_profile(p.model, p.optimizer, tuple(x.shape), compare_torch=False)
    m = profile_update(p.model, p.optimizer, x, y,
                       repeat=5, compare_torch=False)  # the device's: the allocator trace
    return {"small_measured_mib": m.memory_peak / MiB, "small_analytic_mib": a.memory_peak / MiB,
            "small_analytic_error": a.memory_peak / m.memory_peak - 1,
            "small_flops_exact": a.flops_total == m.flops_total}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lean_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--measure", action="store_true",
                    help="also measure one real update at batch 8 x 64x64 (peak, step time)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = run(a.models.split(","), a.batch, a.resolution, a.rank, a.measure)
    print(f"device peak of one AdamW update on the CPU, batch {a.batch} x {a.resolution}^2, "
          f"adapter rank {a.rank} (predicted: tensors + oneDNN scratch, shipped CPU model); "
          "x: vs full FT BN train | vs full FT BN frozen")
    for r in rows:
        extra = ""
        if a.measure:
            extra = (f" | b8x64: measured {r['small_measured_mib']:6.1f} MiB, analytic "
                     f"{r['small_analytic_error']:+.2%}"
                     + ("" if r["small_flops_exact"] else " (FLOPs differ!)"))
            if "time_ratio" in r:
                extra += f", time lean/plain x{r['time_ratio']:.2f}"
        vs_frozen = f"{r['ratio_bn_frozen']:.3f}" if r["ratio_bn_frozen"] else "  -  "
        print(f"{r['model']:13s} {r['config']:30s} {r['peak_mib']:8.1f} MiB  "
              f"x{r['ratio']:.3f} | x{vs_frozen}  floor {r['floor_mib']:6.1f} MiB "
              f"(x{r['above_floor']:.2f} above, at {r['floor_layer']})  "
              f"{r['flops_total'] / 1e9:6.1f} GFLOP{extra}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
