"""Device truth: memory figures checked against what the device itself says, never against the
figure under test.

* CPU: the growth of a fresh process's peak RSS during one update (``/proc/self/status``
  ``VmHWM``, reset through ``/proc/self/clear_refs``; glibc's mmap threshold pinned low so that
  every large block goes back to the OS when freed) against ``profile_update``'s device peak, and
  the allocator's own trace (:func:`convpeft.planner.verify.measure_peak`) against the analytic
  prediction;
* CUDA: ``torch.cuda.max_memory_allocated`` read by the test around an update of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from convpeft.planner.verify import measure_peak
from convpeft.profiler import analytic_profile, profile_update
from convpeft.profiler.calibrate import CALIBRATION, calibrate, prepared_update
from convpeft.profiler.scratch import (
    OpShape,
    ScratchModel,
    features,
    fit_scratch,
    save_calibration,
    scratch_model,
)

ROOT = Path(__file__).resolve().parents[1]

_RSS_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from convpeft.profiler import profile_update
    from convpeft.profiler.calibrate import prepared_update
    from convpeft.profiler.engine import plain_update
    from convpeft.profiler.memory import state_tensors

    def status():
        s = open("/proc/self/status").read()
        return {k: int(re.search(k + r":\\s+(\\d+)", s).group(1)) * 1024
                for k in ("VmRSS", "VmHWM")}

    torch.manual_seed(0)
    torch.set_num_threads(1)
    p = prepared_update("mobilenet_v2", "lora", "freeze", True, True)
    x, y = torch.randn(8, 3, 160, 160), torch.randint(0, 10, (8,))
    prof = profile_update(p.model, p.optimizer, x, y, warmup=1, repeat=0, compare_torch=False)
    p.optimizer.zero_grad(set_to_none=True)
    live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in
            [*p.model.parameters(), *p.model.buffers(), *state_tensors(p.optimizer), x, y]}
    open("/proc/self/clear_refs", "w").write("5")
    before = status()["VmRSS"]
    plain_update(p.model, p.optimizer, x, y, torch.nn.CrossEntropyLoss())
    growth = status()["VmHWM"] - before
    print(json.dumps({"device": prof.memory_peak - sum(live.values()),
                      "tensors": prof.memory_peak_tensors - sum(live.values()),
                      "growth": growth}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_device_peak_is_the_peak_rss_of_a_fresh_process(tmp_path):
    # MobileNetV2 LoRA lean + checkpointed: the update whose oneDNN scratch is largest (the
    # tensor-level figure misses ~13% of it), so the comparison can tell the two apart
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(ROOT)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # RSS counts whole pages and the interpreter's own small allocations: a few % of slack
    assert abs(r["device"] / r["growth"] - 1) < 0.06, r
    # the tensor-level figure is not the device's: it lies well outside the 6% band above
    # (~13% below here: the batch-chunked conv backward leaves that much oneDNN scratch)
    assert r["tensors"] < 0.90 * r["growth"], r


@pytest.fixture(scope="module")
def calibrated() -> ScratchModel:
    """This machine's scratch model, fitted in-test (the shipped default is another CPU's)."""
    return calibrate("cpu", batch=2, resolution=64, save=False).model


@pytest.mark.parametrize("cfg", [
    ("mobilenet_v2", "lora", "freeze", True, True),
    ("mobilenet_v2", "lora-fa", "freeze", True, False),
    ("resnet18", "lora", "freeze", True, False),
    ("resnet18", "full", "train", False, False),
    # channels-last 7x7 depthwise convs (257x their weight in backward scratch), LayerNorm, GELU
    ("convnext_tiny", "lora", "freeze", True, False),
    # grouped convs; LoRA-FA lean's strided shape stubs, which the conv backward copies dense
    ("regnet_x_400mf", "lora-fa", "freeze", True, False),
], ids=lambda c: "-".join(str(v) for v in c))
def test_analytic_device_peak_within_3pct_of_the_allocator(calibrated, cfg):
    torch.manual_seed(0)
    p = prepared_update(*cfg)
    batch, res = 4, 96  # not the calibration's size: the model must carry across sizes
    a = analytic_profile(p.model, p.optimizer, (batch, 3, res, res), compare_torch=False,
                         scratch=calibrated)
    measured, _ = measure_peak(p.model, p.optimizer, batch, res, 10, "cpu")
    assert abs(a.memory_peak / measured - 1) < 0.03, (a.memory_peak, measured)
    assert a.memory_unmeasured_ops == []  # the calibration ran every op kind of these nets
    assert a.memory_by_category["scratch"] == a.memory_peak - sum(
        v for k, v in a.memory_by_category.items() if k != "scratch")


def test_profile_update_device_peak_has_scratch_and_keeps_the_tensor_level():
    torch.manual_seed(0)
    p = prepared_update("mobilenet_v2", "lora", "freeze", True, True)
    x, y = torch.randn(4, 3, 96, 96), torch.randint(0, 10, (4,))
    dev = profile_update(p.model, p.optimizer, x, y, repeat=0, compare_torch=False)
    ten = profile_update(p.model, p.optimizer, x, y, repeat=0, compare_torch=False,
                         allocator_peak=False)
    measured, _ = measure_peak(p.model, p.optimizer, 4, 96, 10, "cpu")
    assert dev.memory_model.startswith("CPU allocator trace")
    assert dev.memory_peak_tensors == ten.memory_peak_tensors == ten.memory_peak
    assert dev.memory_peak > dev.memory_peak_tensors
    assert dev.memory_by_category["scratch"] > 0
    assert sum(dev.memory_by_category.values()) == dev.memory_peak
    assert dev.memory_peak_op.startswith("aten.convolution")  # oneDNN's blocked copies
    assert abs(dev.memory_peak / measured - 1) < 0.01  # the trace of another, plain update
    a = analytic_profile(p.model, p.optimizer, (4, 3, 96, 96), compare_torch=False, device=None)
    assert a.memory_peak == a.memory_peak_tensors == dev.memory_peak_tensors  # exact, as before


def test_scratch_fit_recovers_a_known_model_and_its_block():
    truth = ScratchModel(device="cpu", block=8, coef={
        "conv_bwd/depthwise/s1": [1.0, 1.0, 0.0, 0.0], "conv_fwd/pointwise/s1": [1.0, 0, 0, 0]})
    shapes = [OpShape(key=k, n=n, c_in=c, hw_in=hw, c_out=c if "depth" in k else c * 3,
                      hw_out=hw, w=9, mask=(True, False))
              for k in truth.coef for n in (1, 4) for c in (12, 24, 40) for hw in (64, 256)]
    samples = [(s, truth.predict(s)) for s in shapes]
    fit = fit_scratch(samples, device="cpu", source="test")
    assert fit.block == 8  # channels 12 and 40 pad differently under 8 and 16
    for s in shapes:
        assert abs(fit.predict(s) - truth.predict(s)) <= 0.01 * truth.predict(s) + 1
    odd = next(s for s in shapes if s.c_in == 40)  # 40 channels: 40 under 8, 48 under 16
    assert features(odd, 8) != features(odd, 16)


def test_calibration_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVPEFT_CACHE", str(tmp_path))
    assert "shipped default" in scratch_model("cpu").source  # nothing cached yet
    model = ScratchModel(device="cpu", block=16, coef={"conv_fwd": [1.0, 0, 0, 0]},
                         source="calibrated on a test")
    path = save_calibration(model, "cpu")
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert scratch_model("cpu") == model
    path.write_text("{not json")  # a damaged entry falls back to the shipped default
    assert "shipped default" in scratch_model("cpu").source


def test_plan_verify_measures_the_planned_batch_and_the_next():
    from convpeft.planner import plan

    rows = plan("resnet18", "60MiB", resolution=32, methods=["lora"], ranks=[4], lean=True,
                bn="freeze", verify=True, max_batch=64)
    (row,) = rows
    v = row.verification
    assert v is not None and v.fits and row.fits and row.max_batch == v.batch >= 1
    assert v.measured[v.batch] <= row.budget
    if not row.capped:
        # the plan leaves no fitting batch unused: the next one is over when measured
        assert v.next_fits is False and v.measured[v.batch + 1] > row.budget
    assert "CPU allocator trace" in v.criterion


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lean", [False, True])
def test_cuda_device_peak_is_max_memory_allocated(lean):
    torch.manual_seed(0)
    p = prepared_update("mobilenet_v2", "lora", "freeze", lean, False, device="cuda")
    x = torch.randn(8, 3, 96, 96, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    prof = profile_update(p.model, p.optimizer, x, y, repeat=0, compare_torch=False)
    # the test's own reading: reset, one plain update, max_memory_allocated
    from convpeft.profiler.engine import plain_update

    p.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plain_update(p.model, p.optimizer, x, y, torch.nn.CrossEntropyLoss())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    # above what was live when the update started: ours against the allocator's
    ours, theirs = prof.memory_peak - prof.memory_baseline, peak - base
    assert abs(ours / theirs - 1) < 0.03, (ours, theirs)
    assert prof.memory_model.startswith("CUDA allocator")


def test_device_truth_quick_runs_and_writes_json(tmp_path, capsys):
    from benchmarks import device_truth

    out = tmp_path / "rows.json"
    assert device_truth.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 8 and data["summary"]["rows"] == 8
    for r in rows:
        assert r["measured"] > 0 and r["predicted"] >= r["tensors"] > 0
        assert r["vs_full"] is not None
    full = [r for r in rows if r["method"] == "full" and r["variant"] == "plain"]
    assert all(r["vs_full"] == 1 for r in full)
    assert "predicted within 3% of the measured device peak" in capsys.readouterr().out


def test_device_truth_generality_quick_covers_every_config(tmp_path, capsys):
    # families the scratch model was never calibrated on, every method and a sparse update
    from benchmarks import device_truth

    out = tmp_path / "rows.json"
    assert device_truth.main(["--generality", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    models = device_truth.GENERALITY_QUICK["models"]
    configs = device_truth.GENERALITY["configs"]
    assert [(r["model"], r["method"], r["variant"]) for r in rows] == \
        [(m, c, v) for m in models for c, v in configs]
    calibrated = {c[0] for c in CALIBRATION}
    assert not calibrated & {m.removeprefix("timm:") for m in device_truth.GENERALITY["models"]}
    for r in rows:
        assert r["measured"] > 0 and r["predicted"] >= r["tensors"] > 0
        assert isinstance(r["unmeasured_ops"], list)
        # toy sizes (a few MiB, where fixed bytes weigh most); the committed matrix holds 3%
        assert abs(r["error"]) < 0.05, r
    for m in models:
        sparse = next(r for r in rows if r["model"] == m and r["variant"] == "lean+K2")
        assert sparse["vs_full"] < 0.6  # the last two blocks train: well below full FT
    assert data["summary"]["median_abs_error"] is not None and data["skipped"] == []
    assert "median" in capsys.readouterr().out


def test_planner_truth_quick_plans_fit_and_reach_the_largest_batch(tmp_path, capsys):
    """The planner against the device (issue 36): a budget set half an image above the
    predicted peak at the target batch, the plan measured for real, then one image more at a
    time until an update no longer fits."""
    from benchmarks import planner_truth

    out = tmp_path / "plans.json"
    assert planner_truth.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["model"], r["config"]) for r in rows] == [
        (m, c) for m in planner_truth.QUICK["models"] for c in ("full", "lora r8 lean")]
    for r in rows:
        assert r["planned"] >= 1 and r["measured"] > 0
        peaks = {int(k): v for k, v in r["measured_by_batch"].items()}
        # the largest fitting batch is measured to fit, and the next one up measured not to
        assert peaks[r["largest"]] <= r["budget"] < peaks[r["largest"] + 1]
        assert r["fits"] == (peaks[r["planned"]] <= r["budget"])
        assert r["fits"] and r["reach"] == r["planned"] / r["largest"]
    assert data["summary"]["fit"] == len(rows)
    assert "planned batches fit on the device" in capsys.readouterr().out
