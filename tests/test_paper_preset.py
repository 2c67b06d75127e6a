"""The ``paper`` preset end to end (not ``--dry-run``) on tiny copies of CIFAR-10, CIFAR-10-C and
CIFAR-100 written in the real release formats (:mod:`cifar_files`), read by the real loaders.

The grid is shrunk by flags to one small model (MobileNetV2 at 8x8), full FT and LoRA r=1, one
seed, one epoch of pretraining and fine-tuning; both of the preset's tasks run, on its datasets:
shift = CIFAR-10 -> CIFAR-10-C (the official ``impulse_noise.npy``, the task's default
corruption, at severity 5), new_classes = CIFAR-100's held-out classes.
"""

from __future__ import annotations

import csv

import numpy as np
from cifar_files import write_cifar10, write_cifar10c, write_cifar100

from benchmarks.sweep import runner as rank_sweep
from convpeft.data.tasks import DEFAULT_SHIFT

N_C10C_PER_SEVERITY = 30  # != CIFAR-10's 20 test images: a generated CIFAR-10-C would have 20


def _write_data(root):
    write_cifar10(root, n_per_batch=10, n_test=20, balanced=True)
    corruption, severity = DEFAULT_SHIFT
    rng = np.random.default_rng(0)
    n = N_C10C_PER_SEVERITY
    images = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(np.arange(n) % 10, 5)
    write_cifar10c(root, corruption, images, labels)
    write_cifar100(root, n_train=300, n_test=100, balanced=True)


def test_paper_preset_runs_end_to_end_on_real_format_files(tmp_path, monkeypatch, capsys,
                                                          one_thread):
    monkeypatch.setenv("CONVPEFT_CACHE", str(tmp_path / "cache"))
    data, out = tmp_path / "data", tmp_path / "out"
    _write_data(data)
    rc = rank_sweep.main([
        "--preset", "paper", "--data-root", str(data), "--models", "mobilenet_v2",
        "--methods", "full,lora", "--ranks", "1", "--seeds", "1", "--resolution", "8",
        "--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "8",
        "--pretrain-batch-size", "16", "--profile-repeat", "1",
        "--out", str(out), "--no-plots"])
    assert rc == 0, capsys.readouterr()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    by_task = {(r["task"], r["method"]): r for r in rows}
    assert {r["dataset"] for r in rows if r["task"] == "shift"} == {"cifar10"}
    assert {r["dataset"] for r in rows if r["task"] == "new_classes"} == {"cifar100"}
    shift = by_task[("shift", "lora")]
    # the target test split is the official-format file's severity-5 slice, not generated
    assert int(shift["n_target_test"]) == N_C10C_PER_SEVERITY
    assert (shift["corruption"], int(shift["severity"])) == DEFAULT_SHIFT
    assert int(shift["n_source_test"]) == 20  # CIFAR-10's test batch
    new = by_task[("new_classes", "lora")]
    assert int(new["n_target_test"]) == 50  # one test image per held-out CIFAR-100 class
    for r in rows:
        assert 0 <= float(r["target_acc"]) <= 1 and float(r["flops_total"]) > 0
        assert r["target"] == "conv"  # the paper preset adapts every conv
    findings = (out / "findings.md").read_text()
    assert "## 1. Peak-memory saving" in findings and "mobilenet_v2" in findings
    assert "The study's claims, reproduced and corrected" in findings
