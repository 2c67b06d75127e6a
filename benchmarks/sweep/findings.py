"""The study's two claims, as this toolkit measures them — a markdown summary computed from rows.

1. Memory: how much LoRA/DoRA lower the peak memory of one update vs full fine-tuning, on a
   depthwise-separable net (MobileNet) vs a standard one (ResNet).
2. FLOPs: how much the adapters lower the FLOPs of one update vs full fine-tuning, counted
   correctly (``flops_forward + flops_backward``, grouped/depthwise convs right) and as torch's
   ``FlopCounterMode`` counts it (``flops_torch``). Optimizer arithmetic is left out of both so
   the two counters cover the same work.
3. Lean / checkpointed updates (rows with ``lean`` or ``checkpoint`` set, e.g. ``--lean`` and
   ``--checkpoint`` sweeps written into the same ``--out``): each method's peak against full
   FT's plain peak both ways, with BN in train mode (the study's baseline) and with BN frozen,
   where the rows hold that reference.

Claims 1 and 2 use plain rows only (neither lean nor checkpointed), so mixing variants in one
results file does not change them; claims 1-4 use the rows of one adapter target
(:func:`benchmarks.common.primary_rows`: every conv where such rows exist).

Last, always: "The study's claims, reproduced and corrected"
(:mod:`benchmarks.sweep.study_findings`):
the study's FLOP saving (adapters on standard convs, torch's counter) next to the correct one
and to adapters on every conv, and the memory saving plain and lean; or the commands that
produce the rows it needs.

4. (3. without lean rows) Accuracy: target accuracy per configuration as the mean over seeds
   with its 95% Student-t interval, cut to 0..100% (:mod:`benchmarks.sweep.stats`). Two
   configurations are ranked only where the seeds separate them: paired over the seeds they
   share (the 95% interval of the per-seed difference excludes zero), else by disjoint
   intervals; otherwise they are called *indistinguishable*, and one seed ranks nothing.

    python -m benchmarks.findings results/rank_sweep/results.jsonl

Every number comes from the rows (means over seeds); nothing is hard-coded. Cost figures do not
depend on the seed (a sweep profiles once per configuration); accuracies do.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import (
    MIB,
    VARIANTS,
    cost_field,
    cost_where,
    flag_of,
    method_label,
    num,
    primary_rows,
    rank_of,
    read_results,
    results_parser,
    target_of,
    uses_costs,
    variant_of,
)
from benchmarks.sweep.accuracy_findings import (
    accuracy_intervals,
    accuracy_lines,
    protocol_lines,
)
from benchmarks.sweep.stats import (
    CONFIDENCE,
)
from benchmarks.sweep.study_findings import study_lines

ADAPTERS = ("lora", "dora")
"""The methods both claims are about."""
NO_REFERENCE = "No LoRA/DoRA rows with a full-FT reference of the same model and task."


def _machine(r: dict) -> str:
    """Which processor measured a row, e.g. ``Intel(R) Xeon(R) Processor, 2 threads, torch
    2.14.1`` (the GPU's name on CUDA)."""
    gpu = r.get("env_gpu") if str(r.get("env_device") or "").startswith("cuda") else None
    name = gpu or r.get("env_cpu") or "unknown processor"
    threads = r.get("env_threads")
    parts = [str(name)]
    if threads not in (None, "") and not gpu:
        parts.append(f"{threads} threads")
    if r.get("env_torch_version"):
        parts.append(f"torch {r['env_torch_version']}")
    return ", ".join(parts)


def _precise(r: dict) -> str:
    """How BN was evaluated: rows from before precise BN have no ``precise_bn`` column."""
    if flag_of(r, "precise_bn"):
        return ", BN statistics recomputed for the final weights before evaluating"
    return ", evaluated with the BN running averages of training"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _means(rows: Sequence[dict], fn) -> dict[tuple, float]:
    """Mean of ``fn(row)`` per (model, dataset, task, method, rank) over seeds."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        v = fn(r)
        if v is not None:
            acc[(r["model"], r.get("dataset"), r["task"], r["method"], rank_of(r))].append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _sort_key(kv: tuple) -> tuple:
    model, ds, task, method, rank = kv[0]
    return (str(model), str(ds), str(task), str(method), -1 if rank is None else rank)


def _pivot(recs: list[dict], cell) -> list[str]:
    """Markdown table: a row per (model, task, method), a column per rank, ``cell(rec)`` text."""
    ranks = sorted({r["rank"] for r in recs})
    groups: dict[tuple, dict[int, dict]] = {}
    for r in recs:
        groups.setdefault((r["model"], r["task"], r["method"]), {})[r["rank"]] = r
    lines = ["| model | task | method | " + " | ".join(f"r={k}" for k in ranks) + " |",
             "|---|---|---|" + "---:|" * len(ranks)]
    for (model, task, method), by_rank in groups.items():
        cells = [cell(by_rank[k]) if k in by_rank else "" for k in ranks]
        lines.append(f"| {model} | {task} | {method_label(method)} | "
                     + " | ".join(cells) + " |")
    return lines


def net_kind(rows: Sequence[dict], model: str) -> str:
    """"depthwise-separable" if the sweep recorded depthwise convs in the model, else
    "standard" (from the ``n_depthwise_convs`` column; "?" when it is absent)."""
    vals = [num(r.get("n_depthwise_convs")) for r in rows if r.get("model") == model]
    vals = [v for v in vals if v is not None]
    if not vals:
        return "?"
    return "depthwise-separable" if max(vals) > 0 else "standard"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fwd_bwd(r: dict) -> float | None:
    f, b = num(r.get("flops_forward")), num(r.get("flops_backward"))
    return None if f is None or b is None else f + b


def _fwd_bwd_cost(r: dict) -> float | None:
    f, b = num(r.get("cost_flops_forward")), num(r.get("cost_flops_backward"))
    return None if f is None or b is None else f + b


def memory_savings(rows: Sequence[dict]) -> list[dict]:
    """One record per (model, dataset, task, adapter method, rank): peak vs full FT's peak."""
    ok = [r for r in rows if r.get("status") == "ok"]
    # at the deployment size on the device where the rows carry it (cost_*), else older rows'
    # tensor-level peak at the training size
    pf, cf = cost_field(ok, "memory_peak"), cost_field(ok, "memory_by_category")
    peak = _means(ok, lambda r: num(r.get(pf)))
    act = _means(ok, lambda r: num(r.get(f"{cf}_activations")))
    act_max = _means(ok, lambda r: num(r.get("memory_category_max_activations")))
    out = []
    for (model, ds, task, method, rank), p in sorted(peak.items(), key=_sort_key):
        full = peak.get((model, ds, task, "full", None))
        if method not in ADAPTERS or full is None or rank is None:
            continue
        out.append(dict(
            model=model, dataset=ds, task=task, method=method, rank=rank,
            full_peak=full, peak=p, saving=1 - p / full,
            full_activation_share=(act.get((model, ds, task, "full", None)) or 0) / full,
            full_activation_max=(None if uses_costs(ok)
                                 else act_max.get((model, ds, task, "full", None))),
            activation_share=(act.get((model, ds, task, method, rank)) or 0) / p,
        ))
    return out


def flop_reductions(rows: Sequence[dict]) -> list[dict]:
    """One record per (model, dataset, task, adapter method, rank): FLOP reduction vs full FT,
    by our count and by torch's counter."""
    ok = [r for r in rows if r.get("status") == "ok"]
    ours = _means(ok, _fwd_bwd_cost if uses_costs(ok) else _fwd_bwd)
    # torch's counter runs at the training size only; its reduction is a ratio of two counts
    # there (the deployment size changes batch and pixels, hence both counts, alike up to the
    # stem), so it is compared as a ratio
    torch_ = _means(ok, lambda r: num(r.get("flops_torch")))
    train_ours = _means(ok, _fwd_bwd)
    out = []
    for (model, ds, task, method, rank), o in sorted(ours.items(), key=_sort_key):
        full_o = ours.get((model, ds, task, "full", None))
        if method not in ADAPTERS or rank is None or not full_o:
            continue
        t = torch_.get((model, ds, task, method, rank))
        full_t = torch_.get((model, ds, task, "full", None))
        full_train = train_ours.get((model, ds, task, "full", None))
        tr = train_ours.get((model, ds, task, method, rank))
        out.append(dict(
            train_ours_reduction=(1 - tr / full_train) if tr is not None and full_train
            else None,
            model=model, dataset=ds, task=task, method=method, rank=rank,
            ours_full=full_o, ours=o, ours_reduction=1 - o / full_o,
            torch_full=full_t, torch=t,
            torch_reduction=(1 - t / full_t) if (t is not None and full_t) else None,
            torch_overcount_full=(full_t / full_train) if full_t and full_train else None,
        ))
    return out


def _per_model_summary(recs: list[dict], field: str) -> dict[str, tuple[float, float, float]]:
    """(min, mean, max) of ``field`` per model over tasks, adapters and ranks."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        if r.get(field) is not None:
            by[r["model"]].append(r[field])
    return {m: (min(v), sum(v) / len(v), max(v)) for m, v in by.items() if v}


def findings_markdown(rows: Sequence[dict], out: str = "OUT",
                      convergence: str | Path | None = None) -> str:
    """The markdown summary (both claims, the study's claims corrected), or notes saying what
    the rows lack; ``out`` is the results folder the suggested commands write into;
    ``convergence`` the ``convergence.csv`` of these rows' check, if there is one
    (:mod:`benchmarks.sweep.convergence`)."""
    lines = ["# Rank sweep findings", ""]
    n_ok = sum(r.get("status") == "ok" for r in rows)
    n_fail = sum(r.get("status") == "failed" for r in rows)
    lines.append(f"{n_ok} configurations measured, {n_fail} failed. Means over seeds; "
                 "peak = true simultaneous peak of one update (params + buffers + grads + "
                 "optimizer state + activations + temporaries, and kernel scratch where the "
                 "device's).")
    lines.append("")
    setup = sorted({(r.get("batch_size"), r.get("resolution"), r.get("env_device"),
                     r.get("bn"), _machine(r), _precise(r))
                    for r in rows if r.get("status") == "ok"}, key=str)
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    deploy = uses_costs(ok_rows)
    for bs, res, dev, bn, machine, precise in setup:
        lines.append(f"Trained at batch {bs}, {res}x{res} inputs, on {dev} ({machine}), BN "
                     f"policy {bn!r}{precise}. Accuracies are this machine's: another CPU or GPU "
                     "rounds differently and lands elsewhere within the intervals (check with "
                     "`python -m benchmarks.compare_runs`).")
    if deploy:
        wheres = sorted({cost_where([r]) for r in ok_rows if uses_costs([r])})
        lines.append("Every cost below (peak memory, FLOPs) is taken at the deployment size, "
                     "not the training size: " + "; ".join(wheres) + " (the torchvision "
                     "model with its ImageNet stem, prepared as the row trains it; "
                     "`--cost-at`, `--measure-cost`: docs/rank-sweep.md). The peak is the "
                     "device's: tensors plus kernel scratch.")
    elif ok_rows:
        lines.append("Costs below are tensor-level at the training size (rows written before "
                     "deployment costs; rerun the sweep into the same folder to add them).")
    targets = sorted({target_of(r) for r in rows if r.get("status") == "ok"})
    study_rows, rows = rows, primary_rows(rows)
    main = sorted({target_of(r) for r in rows if r.get("status") == "ok"})
    if targets != ["conv"] and targets:
        lines.append(f"Adapters on {', '.join(f'`{t}`' for t in main)} layers in the sections "
                     "before the last, which compares the rows of every target "
                     f"({', '.join(f'`{t}`' for t in targets)}).")
    lines.append("")

    # sections 1-3 compare updates of every layer; sparse rows (only the last K blocks train)
    # would be averaged into their method's figures there, so they appear in the accuracy
    # section only, each K a configuration of its own
    every = [r for r in rows if r.get("update_blocks") in (None, "")]
    if len(every) < len(rows):
        lines += ["Sections 1-3 compare updates of every layer; the sparse rows (`update_blocks`"
                  " = K: only the last K blocks train) are configurations of their own in the "
                  "accuracy section.", ""]
    plain = [r for r in every if variant_of(r) == "plain"]
    lines += _section("## 1. Peak-memory saving of LoRA/DoRA vs full fine-tuning",
                      memory_savings(plain), lambda recs: _memory_lines(plain, recs))
    lines += _section("## 2. FLOP reduction of LoRA/DoRA vs full fine-tuning (forward + backward)",
                      flop_reductions(plain), lambda recs: _flop_lines(plain, recs))
    lean = lean_savings(every)
    if lean:
        lines += ["## 3. Lean and checkpointed updates vs full fine-tuning", ""]
        lines += _lean_lines(lean)
        lines.append("")
    acc = accuracy_intervals(rows)
    if acc:
        n = 4 if lean else 3  # sections are numbered as they appear
        lines += [f"## {n}. Accuracy after adaptation: mean over seeds, "
                  f"{100 * CONFIDENCE:.0f}% t-interval", "", *accuracy_lines(acc), ""]
    proto = protocol_lines(rows, acc, convergence)
    if proto:
        n = 3 + bool(lean) + bool(acc)
        lines += [f"## {n}. The fine-tuning protocol, and what its seeds tell apart", "",
                  *proto, ""]
    n_sections = 2 + bool(lean) + bool(acc) + bool(proto)
    lines += study_lines(study_rows, out, number=n_sections + 1)
    return "\n".join(lines)


def lean_savings(rows: Sequence[dict]) -> list[dict]:
    """One record per (model, dataset, task, method, rank, bn, variant) of the lean and/or
    checkpointed rows: its peak, and its saving vs full FT's *plain* peak with BN train and with
    BN frozen (None where the rows hold no such reference)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    pf = cost_field(ok, "memory_peak")
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in ok:
        p = num(r.get(pf))
        if p is not None:
            acc[(r["model"], r.get("dataset"), r["task"], r["method"], rank_of(r),
                 r.get("bn"), variant_of(r))].append(p)
    peak = {k: sum(v) / len(v) for k, v in acc.items()}
    out = []
    for (model, ds, task, method, rank, bn, var), p in sorted(peak.items(), key=str):
        if var == "plain":
            continue
        ref = {b: peak.get((model, ds, task, "full", None, b, "plain")) for b in ("train",
                                                                                 "freeze")}
        out.append(dict(model=model, dataset=ds, task=task, method=method, rank=rank, bn=bn,
                        variant=var, peak=p,
                        saving_bn_train=(1 - p / ref["train"]) if ref["train"] else None,
                        saving_bn_frozen=(1 - p / ref["freeze"]) if ref["freeze"] else None))
    return out


def _lean_lines(recs: list[dict]) -> list[str]:
    lines = ["Saving of the peak vs full FT's plain update with BN train | with BN frozen "
             "(n/a: no such full-FT row in the results):", "",
             "| model | task | method | rank | BN | variant | peak [MiB] | vs full FT, BN train "
             "| vs full FT, BN frozen |", "|---|---|---|---:|---|---|---:|---:|---:|"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(recs, key=lambda r: (str(r["model"]), str(r["task"]), str(r["method"]),
                                         r["rank"] or 0, order[r["variant"]])):
        lines.append(f"| {r['model']} | {r['task']} | {method_label(r['method'])} | "
                     f"{'' if r['rank'] is None else r['rank']} | {r['bn']} | {r['variant']} | "
                     f"{r['peak'] / MIB:.1f} | {_pct(r['saving_bn_train'])} | "
                     f"{_pct(r['saving_bn_frozen'])} |")
    return lines


def _section(title: str, recs: list[dict], body: Callable[[list[dict]], list[str]]) -> list[str]:
    """A claim's markdown: title, then ``body(recs)``, or a note when there are no records."""
    return [title, "", *(body(recs) if recs else [NO_REFERENCE]), ""]


def _full_reference(recs: list[dict], *fields: str) -> dict[tuple[str, str], tuple]:
    """Full FT's figures per (model, task), as recorded next to each adapter record."""
    return {(r["model"], r["task"]): tuple(r[f] for f in fields) for r in recs}


def activation_reason(mem: Sequence[dict], model: str) -> str:
    """Why full FT's peak holds (almost) no activations, when it does not: the peak falls after
    backward has freed them, in the optimizer step (parameters, gradients and the optimizer's
    state all live). Empty when activations are part of the peak or were not recorded."""
    recs = [r for r in mem if r["model"] == model]
    share = _mean([r["full_activation_share"] for r in recs])
    most = [r["full_activation_max"] for r in recs if r.get("full_activation_max")]
    if share is None or share >= 0.005 or not most:
        return ""
    return (f" (full FT's peak falls in the optimizer step, after backward has freed the "
            f"activations, which peaked earlier at {max(most) / MIB:.1f} MiB: parameters, "
            "gradients and the optimizer's state are what is live then)")


def _ratio_range(lo: float, hi: float) -> str:
    """A saving range as the peak's ratio to full FT's (a negative saving reads right)."""
    return f"{1 - hi:.2f}x" if abs(hi - lo) < 5e-3 else f"{1 - hi:.2f}x to {1 - lo:.2f}x"


def _memory_lines(rows: Sequence[dict], mem: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    where = cost_where(ok)
    lines = [f"Peaks at {where}.", ""]
    summ = _per_model_summary(mem, "saving")
    for m in dict.fromkeys(r["model"] for r in mem):
        lo, mean, hi = summ[m]
        share = _mean([r["full_activation_share"] for r in mem if r["model"] == m])
        ad_share = _mean([r["activation_share"] for r in mem if r["model"] == m])
        lines.append(
            f"- **{m}** ({net_kind(rows, m)}): a LoRA/DoRA peak is {_ratio_range(lo, hi)} full "
            f"FT's (saving {_pct(lo)} to {_pct(hi)}, mean {_pct(mean)}); activations are "
            f"{_pct(share)} of full FT's peak and {_pct(ad_share)} of the adapters'"
            f"{activation_reason(mem, m)}."
        )
    if uses_costs(ok):
        lines += ["", "What sets the peak at this size: the activations every exact update of "
                  "every layer saves for backward. Adapters remove gradients and optimizer "
                  "state of the frozen weights (full FT's parameters + gradients + AdamW state, "
                  "4x the weights), which is small beside the activations of a 224x224 batch, "
                  "and they add their own branch's activations, so an adapter saves little or "
                  "nothing on its own. What removes activations: lean activations (`--lean`: "
                  "frozen convs, BN and ReLUs save only what backward needs), checkpointing "
                  "(`--checkpoint`: each block's activations recomputed in backward, one extra "
                  "forward), and sparse updates (`--update-blocks K`: the frozen prefix runs "
                  "without a graph, nothing saved before the last K blocks). Section 3 (where "
                  "the results hold lean / checkpointed rows) and the budget run "
                  "(`--preset budget`) measure them at this size."]
    lines += ["", "Full-FT peak per model and task:", ""]
    lines += ["| model | task | full FT peak [MiB] |", "|---|---|---:|"]
    lines += [f"| {m} | {t} | {v / MIB:.1f} |"
              for (m, t), (v,) in _full_reference(mem, "full_peak").items()]
    lines += ["", "Adapter peak [MiB] (saving vs full FT):", ""]
    lines += _pivot(mem, lambda r: f"{r['peak'] / MIB:.1f} ({_pct(r['saving'])})")
    return lines


def _flop_lines(rows: Sequence[dict], fl: list[dict]) -> list[str]:
    lines = []
    ours = _per_model_summary(fl, "ours_reduction")
    theirs = _per_model_summary(fl, "torch_reduction")
    over = _per_model_summary(fl, "torch_overcount_full")
    for m in dict.fromkeys(r["model"] for r in fl):
        lo, mean, hi = ours[m]
        t = theirs.get(m)
        o = over.get(m)
        tt = (f"torch's counter says {_pct(t[0])} to {_pct(t[2])} (mean {_pct(t[1])})"
              if t else "torch's count not recorded")
        oo = f"; torch counts full FT at {o[1]:.2f}x our figure" if o else ""
        lines.append(
            f"- **{m}** ({net_kind(rows, m)}): counted correctly, the adapters cut an "
            f"update's FLOPs by {_pct(lo)} to {_pct(hi)} (mean {_pct(mean)}); {tt}{oo}."
        )
    ok = [r for r in rows if r.get("status") == "ok"]
    if uses_costs(ok):
        r0 = next(r for r in ok if uses_costs([r]))
        t0 = next((r for r in ok if r.get("batch_size") not in (None, "")), r0)
        train = _per_model_summary(fl, "train_ours_reduction")
        size = f"batch {r0['cost_batch']} x {r0['cost_resolution']}x{r0['cost_resolution']}"
        tsize = f"batch {t0.get('batch_size')} x {t0.get('resolution')}x{t0.get('resolution')}"
        lines = []
        for m in dict.fromkeys(r["model"] for r in fl):
            lo, mean, hi = ours[m]
            lines.append(f"- **{m}** ({net_kind(rows, m)}): at {size}, counted correctly "
                         f"(analytic), the adapters cut an update's FLOPs by {_pct(lo)} to "
                         f"{_pct(hi)} (mean {_pct(mean)}).")
        lines += ["", f"Counting check (torch's `FlopCounterMode` runs on real updates, at the "
                  f"training size, {tsize}; both counters on the same updates there):", ""]
        for m in dict.fromkeys(r["model"] for r in fl):
            t, o, tr = theirs.get(m), over.get(m), train.get(m)
            if t and tr:
                lines.append(f"- **{m}**: ours {_pct(tr[0])} to {_pct(tr[2])}, torch's "
                             f"{_pct(t[0])} to {_pct(t[2])}"
                             + (f"; torch counts full FT at {o[1]:.2f}x our figure" if o else "")
                             + ".")
        return lines + ["", f"FLOP reduction vs full FT at {size} (ours):", "",
                        *_pivot(fl, lambda r: _pct(r["ours_reduction"])),
                        "", f"At {tsize}: ours / torch's counter:", "",
                        *_pivot(fl, lambda r: f"{_pct(r['train_ours_reduction'])} / "
                                f"{_pct(r['torch_reduction'])}")]
    lines += ["", "Full FT, forward + backward [MFLOP], ours vs torch's counter:", ""]
    lines += ["| model | task | ours | torch | torch / ours |", "|---|---|---:|---:|---:|"]
    for (m, t), (o, tt) in _full_reference(fl, "ours_full", "torch_full").items():
        ts = "n/a" if tt is None else f"{tt / 1e6:.1f}"
        ratio = "n/a" if tt is None else f"{tt / o:.2f}x"
        lines.append(f"| {m} | {t} | {o / 1e6:.1f} | {ts} | {ratio} |")
    lines += ["", "FLOP reduction vs full FT: ours / torch's counter:", ""]
    lines += _pivot(fl, lambda r: f"{_pct(r['ours_reduction'])} / "
                    f"{_pct(r['torch_reduction'])}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    a = results_parser(
        "python -m benchmarks.findings",
        "Print the markdown findings (memory and FLOP claims) of a results file.",
    ).parse_args(argv)
    rows = read_results(a.results)
    if rows is None:
        return 2
    folder = Path(a.results)
    print(findings_markdown(rows, str(folder if folder.is_dir() else folder.parent)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
