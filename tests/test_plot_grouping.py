"""The figures never average two configurations into one point: rows that differ in a key column
(batch size, ``update_blocks``, lean, ...) are drawn apart, and the drawn values are each
configuration's own (the issue's probe: two sweeps with different ``--batch-size`` in one folder
drew LoRA r=2 at the mean of the two peaks; ``--update-blocks all,3`` drew "full FT" at the mean
of the every-layer and the last-3-blocks rows).

The folder is written through :class:`ResultsStore` (JSONL and its CSV) with rows shaped like
the sweep's; each configuration's cost differs, so a mean would show."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from benchmarks.common import MIB
from benchmarks.plots.make import iter_figures
from benchmarks.sweep.results import ResultsStore, load_results


def _row(method, rank, seed, batch, blocks, peak, flops, acc) -> dict:
    sig = f"sig-b{batch}"  # the settings signature hashes the batch size
    return {
        "key": f"mobilenet_v2|digits|shift|{method}|{rank or '-'}|{seed}|{sig}"
               + ("" if blocks is None else f"|K{blocks}"),
        "model": "mobilenet_v2", "dataset": "digits", "task": "shift", "method": method,
        "rank": rank, "seed": seed, "status": "ok", "batch_size": batch, "resolution": 12,
        "update_blocks": blocks, "lean": False, "checkpoint": False, "target": "conv",
        "bn": "train", "settings_signature": sig, "target_acc": acc, "zero_shot_acc": 0.1,
        "memory_peak": peak // 100, "flops_total": flops // 100,
        "cost_batch": 64, "cost_resolution": 224, "cost_device": "cpu",
        "cost_source": "predicted", "cost_device_name": "test CPU",
        "cost_memory_peak": peak, "cost_flops_total": flops,
        "cost_memory_by_category_activations": peak - 10 * MIB,
        "cost_memory_by_category_params": 10 * MIB,
    }


# (method, rank, batch size, update_blocks) -> (peak bytes, FLOPs, accuracy): all different
CONFIGS = {
    ("full", None, 16, None): (1000 * MIB, 9e9, 0.90),
    ("full", None, 16, 3): (300 * MIB, 3e9, 0.80),
    ("lora", 2, 16, None): (900 * MIB, 8e9, 0.85),
    ("lora", 2, 16, 3): (200 * MIB, 2e9, 0.75),
    ("full", None, 32, None): (1100 * MIB, 9.5e9, 0.91),
    ("lora", 2, 32, None): (950 * MIB, 8.5e9, 0.86),
}


@pytest.fixture(scope="module", params=["jsonl", "csv"])
def rows(request, tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("mixed"))
    for (method, rank, batch, blocks), (peak, flops, acc) in CONFIGS.items():
        for seed in (0, 1):  # the same cost per seed, accuracies a little apart
            store.add(_row(method, rank, seed, batch, blocks, peak, flops, acc + 0.01 * seed))
    path = store.jsonl_path if request.param == "jsonl" else store.csv_path
    return load_results(path)


def _figures(rows):
    figs = dict(iter_figures(rows))
    yield figs
    for f in figs.values():
        plt.close(f)


def test_every_configuration_is_drawn_at_its_own_value(rows):
    for figs in _figures(rows):
        flops = {stem: f for stem, f in figs.items() if stem.startswith("flops_")}
        # three configurations of settings x blocks: batch 16 every layer, batch 16 last 3,
        # batch 32 every layer: a figure each, none averaged
        assert len(flops) == 3, sorted(flops)
        drawn = set()
        for f in flops.values():
            ax = f.axes[0]
            for line in ax.get_lines():
                drawn.update(round(float(y), 6) for y in line.get_ydata())
        expected = {round(fl / 1e9, 6) for (_, _, _, _), (_, fl, _) in CONFIGS.items()}
        assert expected <= drawn, (expected, drawn)
        means_of_two = {round((8e9 + 8.5e9) / 2e9, 6), round((9e9 + 3e9) / 2e9, 6)}
        assert not drawn & means_of_two

        pareto = {stem: f for stem, f in figs.items() if stem.startswith("pareto_")}
        # update_blocks is drawn apart inside one Pareto figure; the batch sizes are not
        assert len(pareto) == 2 and all("batch_size" in s for s in pareto), sorted(pareto)
        xs = set()
        for f in pareto.values():
            for coll in f.axes[0].collections:
                for x, _ in coll.get_offsets():
                    xs.add(round(float(x), 3))
            assert "64 x 224x224" in f.axes[0].get_xlabel()
            assert "cpu, predicted" in f.axes[0].get_xlabel()
        assert {round(p / MIB, 3) for p, _, _ in CONFIGS.values()} <= xs

        memory = {stem: f for stem, f in figs.items() if stem.startswith("memory_")}
        assert len(memory) == 3
        heights = set()
        for f in memory.values():
            for ax in f.axes:
                for bar in ax.patches:
                    heights.add(round(bar.get_y() + bar.get_height(), 3))
        assert {round(p / MIB, 3) for p, _, _ in CONFIGS.values()} <= heights
