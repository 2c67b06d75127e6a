"""Plots of a rank sweep, from its results file alone.

    python -m benchmarks.plot results/rank_sweep/results.jsonl [--plots DIR] [--formats png,svg]
    python -m benchmarks.plot --reference    # redraw the committed plots/ from its CSV

Figures go to ``plots/`` inside the results folder (``results/rank_sweep/plots``; for the
committed ``plots/rank_sweep_default.csv``, ``results/reference/plots``), or where ``--plots``
says. Nothing tracked by git is written unless asked: ``--reference`` alone redraws the committed
reference in ``plots/`` (figures, ``findings.md`` and ``rank_sweep_default_summary.csv``) from
``plots/rank_sweep_default.csv``. To make a new run the reference, copy its ``results.csv`` over
that file first.

Costs are drawn at the rows' deployment size (``cost_*`` columns: ``--cost-at``, the device
peak predicted or measured), the axis labels naming size, device and source; rows from before
those columns existed are drawn at their training size, labelled tensor-level. Rows that differ
in a key column (batch size, ``update_blocks``, lean, ...: :data:`FIGURE_KINDS`) get figures of
their own, the file name suffixed with what sets them apart (``__batch_size-16``).

Per (model, dataset, task):
  ``flops_<model>_<task>``     rank vs FLOPs per update (one line per ranked method; full FT,
                               head and BitFit as horizontal reference lines)
  ``memory_<model>_<task>``    rank vs peak memory, stacked by what is live at the peak (of the
                               plain updates); where the rows also hold lean / checkpointed
                               updates (``lean``/``checkpoint`` columns) their peaks are marked
                               on the same bars
  ``accuracy_<model>_<task>``  rank vs target accuracy, mean over seeds with 95% t-interval
                               error bars cut to 0..100% (no-rank methods and zero-shot: a
                               line, its interval a bar right of the last rank)
  ``pareto_<model>_<task>``    mean accuracy (95% interval bars) vs peak memory per
                               configuration, Pareto front of the means with the band of its
                               members' intervals, rings round the configurations the seeds
                               cannot separate from the most accurate one
Across models:
  ``flop_counters``            our FLOP count vs torch's FlopCounterMode for the same updates,
                               per model (depthwise vs standard nets)

Only rows with ``status == "ok"`` are drawn; accuracy plots are skipped for profile-only runs.
Intervals are :func:`benchmarks.sweep.stats.interval` (Student t over seeds, cut to 0..100%); one
seed draws none. Legends sit beside the axes (or above the bars), never over the data.

Each plot kind has its module (:mod:`benchmarks.plots.flops`, :mod:`benchmarks.plots.memory`,
:mod:`benchmarks.plots.accuracy`; what they share is :mod:`benchmarks.plots.common`); this one
groups the rows, names the files and is the command line.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (CI, headless servers)
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT,
    REFERENCE_CONVERGENCE_CSV,
    REFERENCE_CSV,
    REFERENCE_DIR,
    REFERENCE_SUMMARY_CSV,
    default_plots_dir,
    primary_rows,
    read_results,
    results_parser,
)
from benchmarks.plots.accuracy import pareto_front as pareto_front  # noqa: E402
from benchmarks.plots.accuracy import plot_accuracy, plot_pareto  # noqa: E402
from benchmarks.plots.common import part_suffix, split_configurations  # noqa: E402
from benchmarks.plots.flops import plot_flop_counters, plot_flops  # noqa: E402
from benchmarks.plots.memory import plot_memory  # noqa: E402


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)).strip("-")


def _group(rows: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("model")), str(r.get("dataset")), str(r.get("task")))].append(r)
    return dict(groups)


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        # No creation date and a fixed SVG id salt: the same results give byte-identical files,
        # so committed plots only change in git when the numbers do.
        meta = {"Date": None} if fmt in ("svg", "pdf") else {}
        with plt.rc_context({"svg.hashsalt": "convpeft"}):
            fig.savefig(p, dpi=130, bbox_inches="tight", metadata=meta)
        out.append(p)
    plt.close(fig)
    return out


FIGURE_KINDS = (("flops", "plot_flops", ()),
                ("memory", "plot_memory", ("lean", "checkpoint", "settings_signature")),
                ("accuracy", "plot_accuracy", ()),
                ("pareto", "plot_pareto", ("update_blocks",)))
"""Each per-(model, dataset, task) figure: its name, the function of this module that draws
it (looked up when drawing), and the key columns it
draws apart itself (the memory figure marks the lean / checkpointed variants of a
configuration on its bar; the Pareto figure makes each ``update_blocks`` a point); by every
other key column (:data:`benchmarks.plots.common.KEY_COLUMNS`) the rows are split into
figures of their own, named with what sets them apart, so no point averages two
configurations."""


def iter_figures(rows: Sequence[dict]):
    """``(file stem, figure)`` for every figure the rows support (see :func:`make_plots`)."""
    ok = _ok(primary_rows(rows))
    # looked up now, not at import: a caller (a test) may have replaced one
    draw = {"plot_flops": plot_flops, "plot_memory": plot_memory,
            "plot_accuracy": plot_accuracy, "plot_pareto": plot_pareto}
    for (model, dataset, task), grp in sorted(_group(ok).items()):
        stem = f"{_slug(model)}_{_slug(dataset)}_{_slug(task)}"
        for kind, name, apart in FIGURE_KINDS:
            fn = draw[name]
            for differs, part in split_configurations(grp, apart):
                fig = fn(part, model, dataset, task)
                if fig is not None:
                    yield f"{kind}_{stem}{_slug(part_suffix(differs))}", fig
    fig = plot_flop_counters(ok)
    if fig is not None:
        yield "flop_counters", fig


def make_plots(
    rows: Sequence[dict], plots_dir: str | os.PathLike, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Draw every plot the rows support into ``plots_dir``; returns the files written. Rows of
    one adapter target are drawn (:func:`~benchmarks.common.primary_rows`: every conv where such
    rows exist), so a folder that also holds the study's standard-conv rows is not averaged
    over targets; findings.md compares the targets. Rows that differ in another key column
    (batch size, ``update_blocks``, lean, ... :data:`FIGURE_KINDS`) get figures of their
    own."""
    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, fig in iter_figures(rows):
        written += _save(fig, out_dir, stem, formats)
    return written


def write_reference(formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Redraw the committed reference in ``plots/`` from ``plots/rank_sweep_default.csv``: the
    figures, ``findings.md`` and the summary over seeds. The one call that writes ``plots/``;
    returns the files written."""
    from benchmarks.sweep.findings import findings_markdown
    from benchmarks.sweep.results import load_results
    from benchmarks.sweep.stats import write_summary_csv

    rows = load_results(REFERENCE_CSV)
    files = make_plots(rows, REFERENCE_DIR, formats)
    findings = Path(REFERENCE_DIR) / "findings.md"
    findings.write_text(findings_markdown(rows, DEFAULT_OUT, REFERENCE_CONVERGENCE_CSV) + "\n")
    write_summary_csv(Path(REFERENCE_SUMMARY_CSV), rows)
    return [*files, findings, Path(REFERENCE_SUMMARY_CSV)]


def main(argv: Sequence[str] | None = None) -> int:
    p = results_parser(
        "python -m benchmarks.plot",
        "Regenerate all rank-sweep plots from a results file (.jsonl or .csv) or a results "
        "folder. Writes under the results folder unless --plots says otherwise; only "
        f"--reference writes the committed {REFERENCE_DIR}/.",
        optional=True,
    )
    p.add_argument("--plots", default=None, help="output folder for the figures (default: "
                   "RESULTS_FOLDER/plots; for the committed plots/*.csv, "
                   "results/reference/plots)")
    p.add_argument("--formats", default="png,svg",
                   help="comma-separated figure formats (default: png,svg)")
    p.add_argument("--reference", action="store_true",
                   help=f"redraw the committed reference in {REFERENCE_DIR}/ (figures, "
                   f"findings.md, summary CSV) from {REFERENCE_CSV}; takes no RESULTS")
    a = p.parse_args(argv)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    if a.reference:
        if a.results is not None or a.plots is not None:
            p.error(f"--reference reads {REFERENCE_CSV} and writes {REFERENCE_DIR}/: "
                    "drop RESULTS and --plots, or drop --reference")
        if not Path(REFERENCE_CSV).is_file():  # the committed paths are the checkout's
            repo = Path(__file__).resolve().parents[2]
            p.exit(2, f"{p.prog}: error: --reference reads {REFERENCE_CSV} from the current "
                   f"folder, which has none; run it from the repository's root (cd {repo})\n")
        files = write_reference(formats)
        print(f"{len(files)} files -> {REFERENCE_DIR}/ (from {REFERENCE_CSV})")
        return 0
    if a.results is None:
        p.error("give a results file or folder (e.g. results/rank_sweep), or --reference")
    rows = read_results(a.results)
    if rows is None:
        return 2
    plots = Path(a.plots) if a.plots else default_plots_dir(a.results)
    files = make_plots(rows, plots, formats)
    n_ok = len(_ok(rows))
    print(f"{len(files)} files from {n_ok} ok rows (of {len(rows)}) -> {plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
