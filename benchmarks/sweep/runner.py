"""The rank sweep: backbones x tasks x methods x ranks, each run measured for cost and accuracy.

    python -m benchmarks.rank_sweep                 # offline default grid (digits, 3 seeds)
    python -m benchmarks.rank_sweep --profile-only  # cost of every update, no training, ~1-2 min
    python -m benchmarks.rank_sweep --preset paper --data-root ~/data   # the study's grid
    python -m benchmarks.rank_sweep --preset study  # the study's cost setup (standard convs)

For every configuration (model, task, method, rank, seed) the sweep

1. builds the task and the *source* model once per (model, task, seed): pretrained on the source
   split and cached by :func:`convpeft.train.pretrain` (random init under ``--profile-only``);
2. prepares a copy with the method (adapters, frozen parameters, optimizer) and fine-tunes it on
   the target split, measuring zero-shot / target / source accuracy;
3. profiles ONE update at ``--batch-size`` with :func:`convpeft.profiler.profile_update`
   (FLOPs split by pass, true peak memory by category -- tensor-level on the CPU, the same on
   every CPU model; the device's on CUDA --, time; torch's FlopCounterMode figure) —
   once per configuration, not per seed: what an update costs depends on shapes only, so the
   other seeds' rows copy the profile columns (``profile_seed`` says which seed measured them;
   a resumed sweep reuses a profile already on disk);
4. takes the cost of one update at the deployment size, ``--cost-at`` (default batch 64 x
   224x224; :mod:`benchmarks.sweep.cost`): the device peak predicted from shapes (or measured
   with ``--measure-cost`` in a fresh process), FLOPs, parameters, with ``--budget`` the largest
   batch that fits — the ``cost_*`` columns the figures and findings report; a rerun with
   another ``--cost-at`` recosts the finished rows without training;
5. saves the trainable tensors with safetensors to measure the adapter's size on disk;

and appends one row per (configuration, seed) to ``--out``/results.{jsonl,csv}. The
configurations run one after another in this process, or as Ray tasks with ``--executor ray
[--address ADDR]`` (:mod:`benchmarks.sweep.executor`: the source model built once per group and
shared through Ray's object store, the same rows but for the time columns); either way this
process alone writes the rows, in the grid's order. A rerun resumes per seed.
``results_summary.csv`` folds the seeds: accuracies as mean and 95% t-interval per
configuration (:mod:`benchmarks.sweep.stats`). A configuration that raises (including out-of-memory)
is recorded with ``status="failed"`` and its error, and the sweep goes on. Ctrl-C stops after
writing what is finished; rerunning the same command resumes (finished keys are skipped). At
the end the plots (``--plots``, default ``OUT/plots``; intervals as error bars) and the findings
(``findings.md``: methods ranked only where their intervals separate) are written, all under the
results folder: a sweep never writes the clone's tracked files. The committed reference figures
and findings in ``plots/`` are redrawn from ``plots/rank_sweep_default.csv`` only by
``python -m benchmarks.plot --reference``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.sweep.cli import SweepPlan, build_parser, plan_from_args
from benchmarks.sweep.config import SourceCache
from benchmarks.sweep.executor import make_executor
from benchmarks.sweep.grid import (
    Config,
    SweepSettings,
)
from benchmarks.sweep.results import (
    JSONL_NAME,
    ResultsStore,
    dedupe,
    environment_metadata,
    locked,
    read_jsonl,
)

# ----------------------------------------------------------------------------- the sweep


def _base_row(cfg: Config, s: SweepSettings, env: dict) -> dict:
    return {
        "key": cfg.key(s),
        "model": cfg.model,
        "dataset": s.dataset_for(cfg.task),
        "task": cfg.task,
        "method": cfg.method,
        "rank": cfg.rank,
        "update_blocks": cfg.update_blocks,
        "prefix_chunks": s.prefix_chunks if cfg.update_blocks is not None else None,
        "prefix_stats": s.prefix_stats if cfg.update_blocks is not None else None,
        "seed": cfg.seed,
        "corruption": s.corruption if cfg.task == "shift" else None,
        "severity": s.severity if cfg.task == "shift" else None,
        "epochs": 0 if s.profile_only else s.epochs,
        "batch_size": s.batch_size,
        "resolution": s.resolution,
        "few_shot": s.few_shot,
        "test_per_class": s.test_per_class,
        "replay_per_class": s.replay_per_class if cfg.task == "new_classes" else None,
        "small_input": s.small_input,
        "lean": s.lean,
        "amp": s.amp,
        "checkpoint": s.checkpoint,
        "target": s.target,
        "precise_bn": s.precise_bn if not s.profile_only else None,
        "mode": "profile-only" if s.profile_only else "train",
        "settings_signature": s.signature(),
        # present in every row (None under --profile-only or on failure): a uniform table
        "zero_shot_acc": None,
        "target_acc": None,
        "source_acc": None,
        **env,
    }


def _fmt_flops(v) -> str:
    if v is None:
        return "?"
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if v >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.3g} FLOP"


def summary_line(row: dict) -> str:
    """One concise line per finished configuration."""
    rank = "" if row.get("rank") is None else f"-r{row['rank']}"
    if row.get("update_blocks") not in (None, ""):
        rank += f"-K{row['update_blocks']}"
    head = f"{row['model']} {row['task']} {row['method']}{rank} s{row['seed']}"
    if row.get("status") != "ok":
        return f"FAILED {head}: {row.get('error', '')[:160]}"
    parts = [head]
    if row.get("target_acc") is not None:
        zs = row.get("zero_shot_acc")
        zs = f" (zero-shot {100 * zs:.1f}%)" if zs is not None else ""
        parts.append(f"acc {100 * row['target_acc']:.1f}%{zs}")
    parts.append(f"{_fmt_flops(row.get('flops_total'))}/update")
    if row.get("memory_peak") is not None:
        parts.append(f"peak {row['memory_peak'] / 2**20:.1f} MiB")
    parts.append(f"{row.get('trainable_params', 0):,} trainable")
    if row.get("galore_fallback_weights"):
        n_fb = row["galore_fallback_weights"]
        n_all = n_fb + (row.get("galore_projected_weights") or 0)
        what = "all" if row.get("galore_plain_adamw") else f"{n_fb} of {n_all}"
        parts.append(f"GaLore: {what} weights plain AdamW (rank >= smaller side)")
    parts.append(f"{row.get('wall_time_s', 0):.1f} s")
    return " | ".join(parts)


def run_sweep(plan: SweepPlan, *, log=print, lr_rows: Sequence[dict] = ()
              ) -> tuple[list[dict], bool]:
    """Run (or resume) the planned sweep. Returns (the rows of this grid, interrupted?).

    ``plan.executor`` runs the configurations (:mod:`benchmarks.sweep.executor`); this process
    alone writes their rows, in the grid's order, whichever finishes first. On Ctrl-C the
    results that have arrived are written too (out of order: every row stands alone)."""
    s = plan.settings
    store = ResultsStore(plan.out)
    done = store.done_keys()
    todo = [c for c in plan.configs if c.key(s) not in done]
    skipped = len(plan.configs) - len(todo)
    log(f"rank sweep: {len(plan.configs)} configurations ({skipped} already done, "
        f"{len(todo)} to run) -> {plan.out}")
    env = environment_metadata(s.device)
    sources = SourceCache(s)
    sources.reuse_profiles(store.rows, {c.key(s) for c in plan.configs})
    sources.reuse_lr_choices(store.rows, {c.key(s) for c in plan.configs})
    if lr_rows:  # the convergence check: the first run's chosen rates, not a new search
        sources.reuse_lr_choices(lr_rows, None)
    recost(plan, store, sources, log)
    errlog = plan.out / "errors.log"
    interrupted = False
    arrived: dict[int, tuple[dict, str | None]] = {}
    bar = tqdm(total=len(todo), desc="configs", unit="cfg", dynamic_ncols=True,
               disable=not todo)

    def write(i: int) -> None:
        fields, tb = arrived.pop(i)
        row = _base_row(todo[i], s, env)
        row.update(fields)
        if tb is not None:
            with errlog.open("a") as f:
                f.write(f"== {row['key']}\n{tb}\n")
        store.add(row)
        bar.write(summary_line(row))

    try:
        with make_executor(plan.executor, address=plan.address,
                           cpus_per_task=plan.cpus_per_task,
                           gpus_per_task=plan.gpus_per_task,
                           workers=plan.workers) as executor:
            nxt = 0
            for i, fields, tb in executor.run(todo, sources, bar.set_postfix_str):
                arrived[i] = (fields, tb)
                bar.update(1)
                while nxt in arrived:
                    write(nxt)
                    nxt += 1
    except KeyboardInterrupt:
        interrupted = True
        for i in sorted(arrived):
            write(i)
    finally:
        bar.close()
    keys = {c.key(s) for c in plan.configs}
    rows = [r for r in store.rows if r.get("key") in keys]
    if interrupted:
        log(f"interrupted: {len(rows)} of {len(plan.configs)} configurations are in "
            f"{store.csv_path} (valid); rerun the same command to resume")
    return rows, interrupted


def recost(plan: SweepPlan, store: ResultsStore, sources: SourceCache, log=print) -> int:
    """Give the finished rows of this grid that lack the costs asked for (another
    ``--cost-at``, ``--device``, ``--measure-cost`` or ``--budget``, or rows written before
    costs were taken at a deployment size) those costs, without training again: each such row
    is written anew with its ``cost_*`` columns replaced. Returns how many rows were."""
    from benchmarks.sweep.cost import COST_COLUMNS, is_costed

    s = plan.settings
    by_key = {c.key(s): c for c in plan.configs}
    stale = [r for r in store.rows if r.get("status") == "ok" and r.get("key") in by_key
             and not is_costed(r, s)]
    if stale:
        log(f"{len(stale)} finished rows lack costs at {s.cost_batch}x{s.cost_resolution} "
            f"as asked: costing them (no training)")
    for r in stale:
        row = {k: v for k, v in r.items()
               if not (k in COST_COLUMNS or k.startswith("cost_memory_by_category_"))}
        row.update(sources.cost(by_key[r["key"]]))
        store.add(row)
    return len(stale)


def check_convergence(plan: SweepPlan, rows: list[dict], *, log=print) -> bool:
    """Rerun ``plan`` with twice the steps into ``<out>/steps_x2`` (each method at the rate
    ``rows`` chose) and write ``<out>/convergence.csv`` (:mod:`benchmarks.sweep.convergence`).
    Returns True when interrupted."""
    from benchmarks.sweep.convergence import (
        CONVERGENCE_CSV,
        DOUBLED_DIR,
        compare_steps,
        doubled_settings,
        write_convergence,
    )

    twice = dataclasses.replace(plan, settings=doubled_settings(plan.settings),
                                out=plan.out / DOUBLED_DIR, plots=None)
    twice.out.mkdir(parents=True, exist_ok=True)
    log(f"convergence check: the grid again with twice the steps -> {twice.out}")
    rows2, interrupted = run_sweep(twice, log=log, lr_rows=rows)
    if not interrupted:
        write_convergence(plan.out / CONVERGENCE_CSV, compare_steps(rows, rows2))
    return interrupted


def finish(plan: SweepPlan, rows: list[dict], *, log=print) -> str:
    """Plots + findings for the rows; returns the findings markdown. ``main`` passes every row
    of ``plan.out``'s JSONL (rows another sweep wrote there included), so findings.md always
    matches results.jsonl and results.csv."""
    from benchmarks.sweep.findings import findings_markdown

    if plan.plots is not None:
        from benchmarks.plots.make import make_plots

        # make_plots draws one adapter target (the study's standard-conv rows: findings.md)
        files = make_plots(rows, plan.plots, plan.formats)
        log(f"{len(files)} plot files -> {plan.plots}")
    from benchmarks.sweep.convergence import CONVERGENCE_CSV

    md = findings_markdown(rows, str(plan.out), plan.out / CONVERGENCE_CSV)
    _write_atomic(plan.out / "findings.md", md + "\n")
    if plan.plots is not None:
        _write_atomic(plan.plots / "findings.md", md + "\n")
    return md


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _raise_keyboard_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        plan = plan_from_args(a)
    except ValueError as e:  # one line, exit 2 (argparse's usage block would bury it)
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if a.dry_run:
        for c in plan.configs:
            print(c.key(plan.settings))
        print(f"{len(plan.configs)} configurations")
        return 0
    t0 = time.perf_counter()
    # SIGINT and SIGTERM (Ctrl-C, kill, a job scheduler's timeout) stop the sweep alike: the
    # rows written so far stay valid and the "rerun to resume" message is printed. SIGINT gets
    # our own handler too, because a shell starts background jobs with SIGINT ignored and
    # Python then never installs its KeyboardInterrupt handler.
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _raise_keyboard_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        rows, interrupted = run_sweep(plan)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if interrupted:
        return 130
    if a.check_convergence:
        interrupted = check_convergence(plan, rows)
        if interrupted:
            return 130
    # under the folder's lock: a sweep finishing beside this one cannot interleave a staler
    # findings.md, and the last one to finish writes every row of the JSONL
    with locked(plan.out):
        md = finish(plan, dedupe(read_jsonl(plan.out / JSONL_NAME)))
    print()
    print(md)
    n_fail = sum(r.get("status") != "ok" for r in rows)
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(rows)} rows ({n_fail} failed) -> "
          f"{plan.out / 'results.csv'}")
    if rows and n_fail == len(rows):
        print(f"every configuration failed; see {plan.out / 'errors.log'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
