"""What one update of a sweep configuration costs at the *deployment* size, on the device.

The sweep trains at a proxy size (batch 16 x 12x12 digits for the default grid) to measure
accuracy; what a user must know before training is the cost at the size they train at
(``--cost-at BxR``, default 64 x 224x224: the size docs/memory.md and docs/sparse.md use). Per
configuration this module gives, at that size and for the sweep's device:

* ``predicted`` (always, from shapes only, seconds per configuration): the device peak of one
  update from :func:`convpeft.profiler.analytic_profile` (the tensor timeline plus each op's
  kernel scratch from the calibrated device model, :mod:`convpeft.profiler.scratch`), the
  analytic FLOPs per pass, the trainable parameters, and with a budget the largest batch that
  fits (:func:`convpeft.planner.largest_fitting` over the same predictions);
* ``measured`` (``--measure-cost``): one real update's device peak read from the allocator in
  a fresh process (:func:`convpeft.planner.verify.measure_peak`, what
  :mod:`benchmarks.device_truth` reads: the CPU allocator's trace of the second update, or on
  CUDA ``max_memory_reserved`` with ``max_memory_allocated`` beside it), and the median wall
  time of several updates (CUDA events on a GPU), with the ratio to full fine-tuning's time
  measured in the same sweep process.

The model at the deployment size is the torchvision architecture with its ImageNet stem
(random weights: a cost depends on shapes only), with the task's head size, prepared exactly
as the sweep prepares it (:func:`benchmarks.sweep.grid.method_config`: method, rank, BN
policy, adapter target, lean, checkpoint, sparse blocks and prefix chunks). The proxy's
``small_input`` stem only exists to make 12x12 images work.

The row columns are ``cost_*`` (:data:`COST_COLUMNS`); ``cost_source`` says predicted or
measured, ``cost_device`` which device, ``cost_batch``/``cost_resolution`` the size.
``python -m benchmarks.sweep.cost --probe`` is the fresh process a measurement runs in (JSON
on stdin and stdout; not for users).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.sweep.grid import Config, SweepSettings

DEFAULT_COST_BATCH = 64
DEFAULT_COST_RESOLUTION = 224
COST_REPEAT = 3
"""Timed updates per measured configuration (the median is reported)."""

COST_KEY_COLUMNS: tuple[str, ...] = ("cost_batch", "cost_resolution", "cost_device",
                                     "cost_source")
"""The columns that say at which size, on which device and how a cost was taken: rows that
differ in one of them are never drawn or averaged together."""

COST_COLUMNS: tuple[str, ...] = (
    *COST_KEY_COLUMNS, "cost_device_name", "cost_memory_model", "cost_memory_peak",
    "cost_memory_allocated", "cost_memory_predicted", "cost_memory_error",
    "cost_memory_peak_tensors", "cost_memory_vs_full", "cost_flops_forward",
    "cost_flops_backward", "cost_flops_optimizer", "cost_flops_total",
    "cost_trainable_params", "cost_total_params", "cost_budget", "cost_max_batch",
    "cost_step_time_s", "cost_step_time_vs_full", "cost_time_s", "cost_skipped",
)
"""Every column this module writes (``cost_memory_by_category_*`` besides)."""


def parse_cost_at(s: str) -> tuple[int, int]:
    """``"64x224"`` -> ``(64, 224)``: batch x image side. ``ValueError`` naming the form."""
    try:
        b, r = (int(x) for x in s.lower().replace(" ", "").split("x"))
    except ValueError:
        raise ValueError(f"--cost-at takes BATCHxRESOLUTION, e.g. 64x224 (got {s!r})") from None
    if b < 1 or r < 16:
        raise ValueError(f"--cost-at {s}: batch must be >= 1 and resolution >= 16 (the "
                         "ImageNet stems reduce an image 32-fold)")
    return b, r


def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``; the kind of device a cost is predicted or measured for."""
    return torch.device(device).type


def device_name(device: str) -> str:
    """The processor or GPU a cost describes, e.g. ``Intel(R) Xeon(R) Processor``."""
    if device_type(device) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    from benchmarks.sweep.results import cpu_name

    return cpu_name()


def model_machine(source: str) -> str:
    """The machine a device model describes, from its ``source`` (``"shipped default, fitted on
    Intel(R) Xeon(R) Processor (AVX-512), torch 2.14.1"`` -> ``Intel(R) Xeon(R) Processor
    (AVX-512)``): a prediction is that machine's, whichever machine computed it."""
    text = source.split("fitted on ", 1)[-1]
    return text.split(", torch")[0].strip()


def cost_key(cfg: Config, num_classes: int) -> tuple:
    """What a configuration's cost depends on within one sweep (the settings are shared): not
    the seed nor the task, only the head size."""
    return (cfg.model, num_classes, cfg.method, cfg.rank, cfg.update_blocks)


def full_config(cfg: Config) -> Config:
    """Full fine-tuning of every layer, the reference of the ``*_vs_full`` ratios."""
    return Config(cfg.model, cfg.task, "full", None, cfg.seed, None)


def build_at_cost(cfg: Config, s: SweepSettings, num_classes: int, device: str = "meta"):
    """``cfg``'s model with the ImageNet stem and a ``num_classes`` head on ``device`` (meta: no
    memory), prepared as the sweep prepares it, in train mode. Returns the prepared method
    (``.model``, ``.optimizer``, ``.trainable_params``)."""
    from benchmarks.sweep.grid import method_config
    from convpeft.methods import prepare
    from convpeft.models import build_model

    with torch.device(device):
        net = build_model(cfg.model, num_classes)
    prepared = prepare(net, method_config(cfg, s))
    prepared.train_mode()
    return prepared


def predicted_cost(cfg: Config, s: SweepSettings, num_classes: int) -> dict:
    """The ``cost_*`` columns of ``cfg`` predicted from shapes at ``s``'s cost size and device
    (module docstring). ``cost_skipped`` (and no figures) under ``--amp``: the analytic trace
    runs on the meta device, which has no autocast."""
    from convpeft.planner import DEFAULT_MAX_BATCH, largest_fitting
    from convpeft.profiler import analytic_profile, scratch_model

    dev = device_type(s.device)
    out: dict = {"cost_batch": s.cost_batch, "cost_resolution": s.cost_resolution,
                 "cost_device": dev, "cost_device_name": model_machine(scratch_model(dev).source)}
    if s.amp != "off":
        out["cost_skipped"] = (f"--amp {s.amp}: the device model predicts fp32 updates only "
                               "(rerun with --amp off for deployment costs)")
        return out
    t0 = time.perf_counter()
    p = build_at_cost(cfg, s, num_classes)
    res = s.cost_resolution
    profiles: dict[int, object] = {}

    def profile(n: int):
        if n not in profiles:
            profiles[n] = analytic_profile(p.model, p.optimizer, (n, 3, res, res),
                                           compare_torch=False, device=dev)
        return profiles[n]

    a = profile(s.cost_batch)
    out.update(
        cost_source="predicted", cost_memory_model=a.memory_model,
        cost_memory_peak=a.memory_peak, cost_memory_predicted=a.memory_peak,
        cost_memory_peak_tensors=a.memory_peak_tensors,
        cost_flops_forward=a.flops_forward, cost_flops_backward=a.flops_backward,
        cost_flops_optimizer=a.flops_optimizer, cost_flops_total=a.flops_total,
        cost_trainable_params=int(p.trainable_params),
        cost_total_params=int(sum(q.numel() for q in p.model.parameters())))
    for c, v in a.memory_by_category.items():
        out[f"cost_memory_by_category_{c}"] = v
    if s.budget is not None:
        best, _ = largest_fitting(lambda n: profile(n).memory_peak, s.budget,
                                  DEFAULT_MAX_BATCH, 1)
        out["cost_budget"], out["cost_max_batch"] = s.budget, best
    out["cost_time_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------- measured, fresh process
def measure_in_process(cfg: Config, s: SweepSettings, num_classes: int,
                       repeat: int = COST_REPEAT) -> dict:
    """One configuration measured in THIS process at the cost size on ``s.device``: ``peak``
    (CPU: the allocator's trace of the second update; CUDA: ``max_memory_reserved``),
    ``allocated`` (CUDA: ``max_memory_allocated``; CPU: the same as ``peak``) and ``times``
    (wall seconds of ``repeat`` further updates; CUDA events on a GPU)."""
    from convpeft.planner.verify import measure_peak
    from convpeft.profiler.engine import plain_update

    dev = device_type(s.device)
    torch.manual_seed(0)
    p = build_at_cost(cfg, s, num_classes, device=s.device)
    b, res = s.cost_batch, s.cost_resolution
    peak, allocated = measure_peak(p.model, p.optimizer, b, res, num_classes, dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, res, res, generator=gen).to(s.device)
    y = torch.randint(0, num_classes, (b,), generator=gen).to(s.device)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(repeat):
        if dev == "cuda":  # device time of the update, not the host's launch time
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            plain_update(p.model, p.optimizer, x, y, loss_fn)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            plain_update(p.model, p.optimizer, x, y, loss_fn)
            times.append(time.perf_counter() - t0)
    return {"peak": int(peak), "allocated": int(allocated), "times": times}


def measure_fresh(cfg: Config, s: SweepSettings, num_classes: int,
                  repeat: int = COST_REPEAT) -> dict:
    """:func:`measure_in_process` in a fresh Python process (nothing this process allocated,
    cached or fragmented is in the reading), with this process's torch thread count.
    ``RuntimeError`` with the child's last error line when it fails (e.g. out of memory)."""
    spec = {"cfg": asdict(cfg), "settings": asdict(s), "num_classes": num_classes,
            "repeat": repeat, "threads": torch.get_num_threads()}
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, "-m", "benchmarks.sweep.cost", "--probe"],
                       input=json.dumps(spec), capture_output=True, text=True, env=env,
                       cwd=root)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise RuntimeError(f"--measure-cost of {cfg.label} at {s.cost_batch}x"
                           f"{s.cost_resolution} failed in its process: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measured_cost(cfg: Config, s: SweepSettings, num_classes: int, predicted: dict,
                  full_time: float | None, full_peak: int | None) -> dict:
    """``predicted``'s columns with the measured device peak and time replacing the prediction
    as the row's cost (``cost_source="measured"``): ``cost_memory_peak`` (CPU allocator;
    CUDA reserved), ``cost_memory_allocated``, ``cost_memory_error`` (prediction / measured
    allocated bytes - 1), ``cost_step_time_s`` (median) and the ratios to full fine-tuning's
    measured peak and time (``full_peak``/``full_time``; None: this is full FT itself)."""
    t0 = time.perf_counter()
    m = measure_fresh(cfg, s, num_classes)
    out = dict(predicted)
    step = statistics.median(m["times"])
    out.update(cost_source="measured", cost_memory_peak=m["peak"],
               cost_device_name=device_name(s.device),
               cost_memory_allocated=m["allocated"],
               cost_memory_error=(predicted["cost_memory_predicted"] / m["allocated"] - 1
                                  if predicted.get("cost_memory_predicted") else None),
               cost_memory_model=("CUDA allocator, max_memory_reserved"
                                  if device_type(s.device) == "cuda" else "CPU allocator trace"),
               cost_step_time_s=step)
    out["cost_memory_vs_full"] = m["peak"] / (full_peak or m["peak"])
    out["cost_step_time_vs_full"] = step / (full_time or step)
    out["cost_time_s"] = predicted.get("cost_time_s", 0) + time.perf_counter() - t0
    return out


class CostCache:
    """The cost columns of each configuration of one sweep, computed once (not per seed nor
    per task of equal head size), with full fine-tuning's figures for the ratios: full FT of
    the same model is costed first whenever a ratio needs it, so that every ratio of a
    measured run divides two measurements of this process."""

    def __init__(self, settings: SweepSettings):
        self.s = settings
        self.costs: dict[tuple, dict] = {}

    def columns(self, cfg: Config, num_classes: int) -> dict:
        key = cost_key(cfg, num_classes)
        if key not in self.costs:
            try:
                self.costs[key] = self._compute(cfg, num_classes)
            except Exception as e:  # noqa: BLE001 - the row's accuracy stands without its cost
                # (e.g. out of memory at the deployment size): say why in the row, go on
                self.costs[key] = {
                    "cost_batch": self.s.cost_batch, "cost_resolution": self.s.cost_resolution,
                    "cost_device": device_type(self.s.device),
                    "cost_skipped": f"{type(e).__name__}: {e}"[:500]}
        return dict(self.costs[key])

    def _compute(self, cfg: Config, num_classes: int) -> dict:
        pred = predicted_cost(cfg, self.s, num_classes)
        if pred.get("cost_skipped"):
            return pred
        is_full = cost_key(full_config(cfg), num_classes) == cost_key(cfg, num_classes)
        full = None if is_full else self.columns(full_config(cfg), num_classes)
        if not self.s.measure_cost:
            ref = pred["cost_memory_peak"] if full is None else full.get("cost_memory_peak")
            pred["cost_memory_vs_full"] = pred["cost_memory_peak"] / ref if ref else None
            return pred
        return measured_cost(cfg, self.s, num_classes, pred,
                             None if full is None else full.get("cost_step_time_s"),
                             None if full is None else full.get("cost_memory_peak"))


def wanted(s: SweepSettings) -> dict:
    """The cost columns a row must carry to count as costed under ``s`` (a resumed sweep
    recosts the rows that do not: another size, device, source or budget)."""
    return {"cost_batch": s.cost_batch, "cost_resolution": s.cost_resolution,
            "cost_device": device_type(s.device),
            "cost_source": "measured" if s.measure_cost else "predicted",
            "cost_budget": s.budget}


def is_costed(row: dict, s: SweepSettings) -> bool:
    """Does ``row`` carry the costs ``s`` asks for (:func:`wanted`)? Rows under ``--amp`` count
    as costed once they say why they have none."""
    w = wanted(s)
    if row.get("cost_skipped"):
        return all(row.get(k) == w[k] for k in ("cost_batch", "cost_resolution"))
    return all(row.get(k) == v for k, v in w.items())


def _probe() -> int:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(int(spec["threads"]))
    settings = dict(spec["settings"])
    s = SweepSettings(**settings)
    cfg = Config(**spec["cfg"])
    out = measure_in_process(cfg, s, int(spec["num_classes"]), int(spec["repeat"]))
    print(json.dumps(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--probe"]:
        return _probe()
    print("usage: python -m benchmarks.sweep.cost --probe  (the fresh process of "
          "--measure-cost; run python -m benchmarks.rank_sweep --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
