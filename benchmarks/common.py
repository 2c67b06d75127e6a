"""Small helpers the benchmark scripts share: reading result rows, method display names, the
results-file command line, JSON output.

Method names and labels come from the methods registry (:func:`convpeft.methods.get_method`),
so a method registered there is named the same in every plot and report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.sweep.results import load_results
from benchmarks.sweep.stats import num as num  # re-exported: the benchmarks parse numbers with it
from convpeft.methods import get_method, list_methods

MIB = 2**20


def rank_of(row: dict) -> int | None:
    """The row's rank as an int; None for methods without one (``None`` or an empty CSV cell)."""
    v = row.get("rank")
    return None if v in (None, "") else int(v)


def blocks_of(row: dict) -> int | None:
    """The row's ``update_blocks`` (only the last K blocks trained) as an int; None where every
    layer trained (``None``, an empty CSV cell, or ``"all"``)."""
    k = row.get("update_blocks")
    return None if k in (None, "", "all") else int(float(k))


def blocks_label(k: object) -> str:
    """`` last K blocks`` (`` last block`` for 1) for an ``update_blocks`` value; empty where
    every layer trained."""
    if k in (None, ""):
        return ""
    return " last block" if str(k) == "1" else f" last {k} blocks"


def flag_of(row: dict, key: str, default: bool = False) -> bool:
    """A boolean column of a row as a bool: parsed rows hold True/False, rows read straight
    from a CSV hold "True"/"False"; ``default`` where the cell is missing or empty (rows from
    before the column existed)."""
    v = row.get(key)
    if v in (None, ""):
        return default
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1")


def variant_of(row: dict) -> str:
    """How a row's update ran: ``"plain"``, ``"lean"``, ``"ckpt"`` or ``"lean + ckpt"``
    (the ``lean``/``checkpoint`` columns; rows from before they existed are plain)."""
    lean, ckpt = bool(row.get("lean")), bool(row.get("checkpoint"))
    return {(False, False): "plain", (True, False): "lean", (False, True): "ckpt",
            (True, True): "lean + ckpt"}[(lean, ckpt)]


VARIANTS = ("plain", "lean", "ckpt", "lean + ckpt")


def target_of(row: dict) -> str:
    """The layers a row's adapters took (the ``target`` column, a :mod:`convpeft.core.layer_kinds`
    target); rows from before the column existed had them on every conv."""
    return row.get("target") or "conv"


def uses_target(row: dict) -> bool:
    """Whether the row's method puts anything on the ``target`` layers (the ranked methods:
    adapters, GaLore); full FT, head only and BitFit cost the same whatever the target."""
    m = row.get("method")
    return m not in list_methods() or get_method(m).ranked


def primary_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows of one adapter target, for the per-method tables and plots: where rows with
    adapters on every conv (``conv``) exist, rows of other targets whose method uses one are left
    out (they are compared in findings.md's study section instead); otherwise all rows."""
    if any(uses_target(r) and target_of(r) == "conv" for r in rows):
        return [r for r in rows if not uses_target(r) or target_of(r) == "conv"]
    return list(rows)


def method_label(method: str) -> str:
    """Display name of a method ("LoRA", "full FT"); the name itself if it is not registered
    (rows of a method registered only in the run that wrote them)."""
    return get_method(method).label if method in list_methods() else method


def uses_costs(rows: Sequence[dict]) -> bool:
    """Whether the rows carry costs at a deployment size (``cost_memory_peak``; rows written
    before it existed hold only the tensor-level profile at the training size)."""
    return any(num(r.get("cost_memory_peak")) is not None for r in rows)


def cost_field(rows: Sequence[dict], field: str) -> str:
    """``cost_<field>`` where the rows carry deployment costs, else the training-size
    ``<field>`` of older rows."""
    return f"cost_{field}" if uses_costs(rows) else field


def cost_where(rows: Sequence[dict]) -> str:
    """Where the drawn costs were taken, for axis labels and titles: e.g. ``batch 64 x
    224x224, cpu, predicted (device model of Intel(R) Xeon(R) Processor)``, ``batch 64 x
    224x224, cpu, measured (AMD EPYC)``, or for older rows ``batch 32 x 12x12 (the training
    size), tensor-level``."""
    if uses_costs(rows):
        r = next(r for r in rows if num(r.get("cost_memory_peak")) is not None)
        name = r.get("cost_device_name")
        how = str(r.get("cost_source"))
        if name:
            how += f" (device model of {name})" if how == "predicted" else f" ({name})"
        return (f"batch {r.get('cost_batch')} x {r.get('cost_resolution')}x"
                f"{r.get('cost_resolution')}, {r.get('cost_device')}, {how}")
    r = rows[0] if rows else {}
    return (f"batch {r.get('batch_size')} x {r.get('resolution')}x{r.get('resolution')} (the "
            "training size), tensor-level")


DEFAULT_OUT = "results/rank_sweep"
"""The rank sweep's results folder when ``--out`` is not given."""
REFERENCE_DIR = "plots"
"""The committed reference run: its rows (``rank_sweep_default.csv``), their summary, figures and
findings. Written only by ``python -m benchmarks.plot --reference``, never by a sweep."""
REFERENCE_CSV = f"{REFERENCE_DIR}/rank_sweep_default.csv"
"""The committed reference run's rows."""
REFERENCE_SUMMARY_CSV = f"{REFERENCE_DIR}/rank_sweep_default_summary.csv"
"""Their summary over seeds (:func:`benchmarks.sweep.stats.write_summary_csv`)."""
REFERENCE_CONVERGENCE_CSV = f"{REFERENCE_DIR}/rank_sweep_default_convergence.csv"
"""Their convergence check (``--check-convergence``'s ``convergence.csv``)."""
REFERENCE_REDRAWN = "results/reference/plots"
"""Where ``python -m benchmarks.plot plots/rank_sweep_default.csv`` draws without ``--plots``
(ignored by git, like everything under ``results/``)."""


def default_plots_dir(results: str | Path) -> Path:
    """Where figures (and the sweep's copy of findings.md) go when ``--plots`` is not given, for
    a results folder or file: ``<results folder>/plots`` (``results/rank_sweep/plots`` for the
    default sweep), and ``results/reference/plots`` for the committed rows in ``plots/``. Never
    ``plots/`` itself: a run leaves the clone's tracked files alone; the committed figures are
    redrawn only by ``python -m benchmarks.plot --reference``."""
    folder = Path(results)
    if folder.suffix in (".jsonl", ".csv"):
        folder = folder.parent
    # resolved, so that an absolute or ./-prefixed spelling of plots/ counts too
    if folder.resolve() == Path(REFERENCE_DIR).resolve():
        return Path(REFERENCE_REDRAWN)
    return folder / "plots"


def results_parser(prog: str, description: str, optional: bool = False
                   ) -> argparse.ArgumentParser:
    """An argument parser whose first argument is a results file or folder (``optional``: it
    may be left out, ``None`` then)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("results", nargs="?" if optional else None,
                   help="results.jsonl / results.csv, or the folder holding them")
    return p


def read_results(path: str) -> list[dict] | None:
    """The rows of a results file/folder, or None after a one-line error on stderr (the
    caller exits with 2)."""
    try:
        return load_results(path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def write_json(path: str | None, rows: Sequence[dict[str, Any]], indent: int = 1) -> None:
    """Write ``rows`` as JSON to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(list(rows), f, indent=indent)
