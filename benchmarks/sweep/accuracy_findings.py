"""The accuracy side of findings.md: intervals over seeds, what the seeds separate, and the
fine-tuning protocol that produced them.

:func:`accuracy_intervals` turns rows into one record per configuration (target accuracy as a
95% t-interval over seeds, per-seed values for paired comparisons); :func:`separation` says
whether the seeds separate two records; :func:`accuracy_lines` is the accuracy section;
:func:`protocol_lines` the protocol section: how each row was trained (steps, schedule, the
learning rate each method was given and how it was chosen), how precise the intervals are, the
configurations below head only, which rank and method pairs the seeds separate, and the
convergence check's verdict when ``convergence.csv`` lies beside the rows
(:mod:`benchmarks.sweep.convergence`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import blocks_label, blocks_of, method_label, num, rank_of
from benchmarks.sweep.stats import (
    CONFIDENCE,
    compare,
    compare_paired,
    metric_interval,
    paired_interval,
)


def accuracy_intervals(rows: Sequence[dict]) -> list[dict]:
    """One record per (model, dataset, task, settings, method, rank, update_blocks) with a
    target accuracy:
    ``target``/``source``/``zero_shot`` :class:`~benchmarks.sweep.stats.Interval` over the seeds of
    its ``ok`` rows (``source``/``zero_shot`` None when absent), ``seeds`` and ``by_seed``
    (seed -> target accuracy, for paired comparisons)."""
    vals: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if r.get("status") != "ok" or num(r.get("target_acc")) is None:
            continue
        k = (r["model"], r.get("dataset"), r["task"], r.get("settings_signature"), r["method"],
             rank_of(r), blocks_of(r))
        d = vals.setdefault(k, {"target_acc": [], "source_acc": [], "zero_shot_acc": [],
                                "seed": [], "by_seed": {}})
        for f in ("target_acc", "source_acc", "zero_shot_acc"):
            if num(r.get(f)) is not None:
                d[f].append(num(r.get(f)))
        d["seed"].append(r.get("seed"))
        if r.get("seed") not in (None, ""):
            d["by_seed"][int(r["seed"])] = num(r["target_acc"])
    out = []
    for (model, ds, task, sig, method, rank, blocks), d in sorted(
            vals.items(), key=lambda kv: tuple(str(x) for x in kv[0][:5]) + (
                -1 if kv[0][5] is None else kv[0][5],
                -1 if kv[0][6] is None else -kv[0][6])):
        out.append(dict(
            model=model, dataset=ds, task=task, signature=sig, method=method, rank=rank,
            update_blocks=blocks,
            seeds=sorted(s for s in d["seed"] if s is not None),
            target=metric_interval(d["target_acc"], "target_acc"), by_seed=d["by_seed"],
            source=(metric_interval(d["source_acc"], "source_acc") if d["source_acc"]
                    else None),
            zero_shot=(metric_interval(d["zero_shot_acc"], "zero_shot_acc")
                       if d["zero_shot_acc"] else None),
        ))
    return out


def _config_label(rec: dict) -> str:
    rank = "" if rec["rank"] is None else f" r={rec['rank']}"
    return method_label(rec["method"]) + rank + blocks_label(rec.get("update_blocks"))


def separation(a: dict, b: dict) -> int | None:
    """Do the seeds separate record ``a``'s target accuracy from ``b``'s? ``1`` above, ``-1``
    below, ``0`` indistinguishable, None without intervals. Paired over the seeds both ran
    (same split, source model and sample per seed) when they share two or more; else by
    disjoint intervals (see :mod:`benchmarks.sweep.stats`)."""
    diff = paired_interval(a.get("by_seed", {}), b.get("by_seed", {}))
    if diff is not None:
        return compare_paired(diff)
    return compare(a["target"], b["target"])


def _verdict(a: dict, b: dict) -> str:
    """How record ``a`` compares with ``b``: "above", "below", "indistinguishable", or
    "no interval" (one seed)."""
    return {1: "above", -1: "below", 0: "indistinguishable",
            None: "no interval"}[separation(a, b)]


def accuracy_lines(acc: list[dict]) -> list[str]:
    """Per (model, task): the best configuration, which ones its interval cannot separate from
    it, which lie below; each ranked method vs full FT per rank; then the table."""
    groups: dict[tuple, list[dict]] = {}
    for r in acc:
        groups.setdefault((r["model"], r["dataset"], r["task"], r["signature"]), []).append(r)
    several = len({(m, t) for m, _, t, _ in groups}) < len(groups)
    ns = sorted({r["target"].n for r in acc})
    n_txt = str(ns[0]) if len(ns) == 1 else f"{ns[0]} to {ns[-1]}"
    lines = [f"Target test accuracy, mean over {n_txt} seed(s) with its {100 * CONFIDENCE:.0f}% "
             "Student-t interval, cut to 0..100% (an accuracy's true mean lies there, so "
             "the cut loses no coverage). A configuration is ranked above another only where "
             "the seeds separate them: configurations run on the same seeds share, seed by "
             "seed, the data split, source model and few-shot sample, so they are compared "
             f"paired (the {100 * CONFIDENCE:.0f}% interval of the per-seed difference must "
             "exclude zero), others by disjoint intervals. Otherwise the two are "
             "*indistinguishable* at this "
             "number of seeds.", ""]
    if ns[0] < 2:
        lines += ["Some configurations have one seed only: they get no interval and are not "
                  "ranked (run the sweep with `--seeds 3` or more).", ""]
    for (model, ds, task, sig), recs in groups.items():
        name = f"{model}, {task}" + (f" ({ds}, settings {sig})" if several else "")
        best = max(recs, key=lambda r: r["target"].mean)
        zs = [r["zero_shot"] for r in recs if r["zero_shot"] is not None]
        zs_txt = ("" if not zs else f" (zero-shot {100 * zs[0].mean:.1f}%, one seed)"
                  if zs[0].low is None else f" (zero-shot {zs[0].format()})")
        if best["target"].low is None:
            lines.append(f"- **{name}**{zs_txt}: highest mean {_config_label(best)} "
                         f"{best['target'].format()}; no intervals, no ranking.")
            continue
        others = sorted((r for r in recs if r is not best), key=lambda r: -r["target"].mean)
        sep = [separation(r, best) for r in others]  # one paired comparison per record
        same = [r for r, v in zip(others, sep, strict=True) if v in (0, None)]
        below = [r for r, v in zip(others, sep, strict=True) if v == -1]
        text = (f"- **{name}**{zs_txt}: highest mean {_config_label(best)} "
                f"{best['target'].format()}")
        text += ("; indistinguishable from it: " + ", ".join(_config_label(r) for r in same)
                 if same else "; every other configuration is below it")
        if below and same:
            text += "; below it (the seeds separate them): " + ", ".join(
                _config_label(r) for r in below)
        lines.append(text + ".")
        full = next((r for r in recs if r["method"] == "full" and r["rank"] is None
                     and r.get("update_blocks") is None), None)
        if full is None:
            continue
        ranked = [r for r in recs if r["rank"] is not None]
        for method in dict.fromkeys(r["method"] for r in ranked):
            parts = [f"r={r['rank']}" + blocks_label(r.get("update_blocks"))
                     + f" {_verdict(r, full)}" for r in ranked if r["method"] == method]
            lines.append(f"  - {method_label(method)} vs full FT: " + ", ".join(parts) + ".")
    lines += ["", "Target accuracy [%], mean [95% interval] over seeds:", ""]
    ranks = sorted({r["rank"] for r in acc if r["rank"] is not None})
    cols = (["no rank"] if any(r["rank"] is None for r in acc) else []) + [f"r={k}"
                                                                           for k in ranks]
    lines += ["| model | task | method | " + " | ".join(cols) + " |",
              "|---|---|---|" + "---:|" * len(cols)]
    rows_: dict[tuple, dict] = {}
    for r in acc:
        rows_.setdefault((r["model"], r["task"], r["signature"], r["method"],
                          r.get("update_blocks")), {})[r["rank"]] = r
    for (model, task, _, method, blocks), by_rank in rows_.items():
        keys = ([None] if "no rank" in cols else []) + ranks
        cells = [by_rank[k]["target"].format(unit="") if k in by_rank else "" for k in keys]
        label = method_label(method) + ("," + blocks_label(blocks) if blocks is not None
                                        else "")
        lines.append(f"| {model} | {task} | {label} | " + " | ".join(cells) + " |")
    return lines


def _vals(rows: Sequence[dict], col: str) -> str:
    vs = sorted({str(r.get(col)) for r in rows if r.get(col) not in (None, "")}, key=_numkey)
    return "/".join(vs) if vs else "?"


def per_task(rows: Sequence[dict], col: str) -> str:
    """``col``'s value, or per task where the tasks differ: "48 (shift), 96 (new_classes)"."""
    tasks = list(dict.fromkeys(r.get("task") for r in rows))
    each = {t: _vals([r for r in rows if r.get("task") == t], col) for t in tasks}
    if len(set(each.values())) <= 1:
        return _vals(rows, col)
    return ", ".join(f"{v} ({t})" for t, v in each.items())


def _numkey(v: str) -> tuple:
    x = num(v)
    return (0, x, "") if x is not None else (1, 0.0, v)


def _half_width_lines(acc: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in acc):
        hw = sorted(((r["target"].half_width, r) for r in acc
                     if r["model"] == model and r["target"].half_width is not None),
                    key=lambda t: t[0])
        if not hw:
            continue
        med = hw[len(hw) // 2][0] if len(hw) % 2 else (hw[len(hw) // 2 - 1][0]
                                                         + hw[len(hw) // 2][0]) / 2
        worst = hw[-1]
        out.append(f"- {model}: median half-width {100 * med:.1f} points, largest "
                   f"{100 * worst[0]:.1f} ({worst[1]['task']}, {_config_label(worst[1])}), over "
                   f"{len(hw)} configurations")
    return out


def _pairs(acc: list[dict]) -> list[tuple[dict, dict]]:
    """The comparisons the rank sweep exists for: each ranked method's ranks against each
    other, and the ranked methods against each other at each rank (same model, task, settings
    and update_blocks)."""
    groups: dict[tuple, list[dict]] = {}
    for r in acc:
        groups.setdefault((r["model"], r["dataset"], r["task"], r["signature"],
                           r.get("update_blocks")), []).append(r)
    out = []
    for recs in groups.values():
        ranked = [r for r in recs if r["rank"] is not None]
        for i, a in enumerate(ranked):
            for b in ranked[i + 1:]:
                if a["method"] == b["method"] or a["rank"] == b["rank"]:
                    out.append((a, b))
    return out


def _read_convergence(path: Path) -> list[dict]:
    from benchmarks.sweep.convergence import read_records

    return [{**c, "rank": None if c.get("rank") in (None, "") else int(c["rank"])}
            for c in read_records(path) if c.get("update_blocks") in (None, "")]


def _why_below(r: dict, head: dict, rows: Sequence[dict], conv: dict) -> str:
    """What the protocol's own evidence says about a configuration below head only: not
    converged (twice the steps closes the gap), its rate at the edge of the grid, or
    neither."""
    c = conv.get((r["model"], r["task"], r["method"], r["rank"]))
    h = conv.get((head["model"], head["task"], "head", None))
    if c is not None and c["mean_x2"] is not None and c["mean_x2"] >= (
            h["mean_x2"] if h is not None and h["mean_x2"] is not None else head["target"].mean):
        return (f"not converged: with twice the steps it reaches {100 * c['mean_x2']:.1f}, "
                "head only's level")
    grid = next((str(x.get("lr_grid_val", "")).split() for x in rows
                 if x.get("lr_source") == "tuned" and x["model"] == r["model"]
                 and x["task"] == r["task"] and x["method"] == r["method"]), [])
    if len(grid) > 1 and (grid[0].endswith("*") or grid[-1].endswith("*")):
        return ("its chosen rate is at the edge of the grid, so a better rate may lie "
                "beyond it")
    tail = (f" (twice the steps: {100 * c['mean_x2']:.1f})" if c is not None
            and c["mean_x2"] is not None else " (convergence not checked)")
    return ("neither its tuned rate nor more steps close the gap" + tail + ": on this "
            "task, training more than the head loses to a new head on the source features")


def protocol_lines(rows: Sequence[dict], acc: list[dict],
                   convergence: str | Path | None = None) -> list[str]:
    """The protocol section (see the module docstring); [] for rows without accuracies.
    ``convergence``: the rows' ``convergence.csv``, where checked."""
    ok = [r for r in rows if r.get("status") == "ok" and num(r.get("target_acc")) is not None]
    if not ok or not acc:
        return []
    lines = []
    shared = {r.get("source_weights_sha256") for r in ok if r.get("seed") not in (None, "")}
    n_models = len({(r["model"], r["task"]) for r in ok})
    src = ("one source model per (model, task), pretrained once and adapted by every seed (the "
           "seeds draw the few-shot sample, the adapters' init and the order)"
           if len(shared) <= n_models else "a source model per seed")
    lines.append(
        f"Every configuration: {per_task(ok, 'steps')} optimizer steps at batch "
        f"{_vals(ok, 'batch_size')}, schedule {_vals(ok, 'schedule')} (cosine: warm-up over "
        f"the first 10% of the steps, then a half cosine to zero); {src}; "
        f"{_vals(ok, 'n_target_train')} target training images, {_vals(ok, 'n_target_val')} "
        f"validation and {_vals(ok, 'n_target_test')} test images per task (every held-out "
        "image: for new_classes the target classes' training images no split took join "
        "the test split).")
    tuned = {}
    for r in ok:
        if r.get("lr_source") == "tuned":
            tuned.setdefault((r["model"], r["task"], method_label(r["method"])
                              + blocks_label(blocks_of(r))), r)
    if tuned:
        lines += ["", "Learning rates, each chosen once per (model, task, method) by "
                  "validation accuracy among the method's default rate times each `--lr-grid` "
                  "multiplier, at the first seed and the middle rank (`lr`, `lr_grid_val`, "
                  "`lr_tuned_on` columns; * = chosen):", "",
                  "| model | task | method | rate | validation accuracy per rate |",
                  "|---|---|---|---:|---|"]
        lines += [f"| {m} | {t} | {label} | {float(r['lr']):.0e} | {r.get('lr_grid_val', '')} |"
                  for (m, t, label), r in tuned.items()]
        for end, word in ((-1, "largest"), (0, "smallest")):
            edge = [k for k, r in tuned.items()
                    if len(str(r.get("lr_grid_val", "")).split()) > 1
                    and str(r.get("lr_grid_val", "")).split()[end].endswith("*")]
            if edge:
                lines += ["", f"{len(edge)} of {len(tuned)} chose the grid's {word} rate (one "
                          "beyond it might do better still): " + ", ".join(
                              f"{m} {t} {label}" for m, t, label in edge) + "."]
    lines += ["", f"Precision of target accuracy ({100 * CONFIDENCE:.0f}% t-interval "
              "half-width):", "", *_half_width_lines(acc)]
    conv = {} if convergence is None or not Path(convergence).is_file() else {
        (c["model"], c["task"], c["method"], c["rank"] or None): c
        for c in _read_convergence(Path(convergence))}
    below = []
    for r in acc:
        head = next((h for h in acc if h["method"] == "head" and h["model"] == r["model"]
                     and h["task"] == r["task"] and h["signature"] == r["signature"]
                     and h.get("update_blocks") is None), None)
        if head is not None and r is not head and separation(r, head) == -1:
            below.append(f"{r['model']} {r['task']} {_config_label(r)} "
                         f"({100 * r['target'].mean:.1f} vs {100 * head['target'].mean:.1f}: "
                         f"{_why_below(r, head, ok, conv)})")
    lines += ["", "Below head only (the seeds separate them): " + (
        "; ".join(below) + "." if below else "none: every configuration is at least as "
        "accurate as head only on its task, or indistinguishable from it.")]
    pairs = _pairs(acc)
    if pairs:
        seps = [(a, b, separation(a, b)) for a, b in pairs]
        apart = [(a, b, v) for a, b, v in seps if v in (1, -1)]
        lines += ["", f"Rank and method pairs (each ranked method's ranks; the ranked methods "
                  f"at each rank): the seeds separate **{len(apart)} of {len(pairs)}**" + (
                      ":" if apart else ".")]
        for a, b, v in apart:
            hi, lo = (a, b) if v == 1 else (b, a)
            lines.append(f"- {a['model']} {a['task']}: {_config_label(hi)} "
                         f"{100 * hi['target'].mean:.1f} > {_config_label(lo)} "
                         f"{100 * lo['target'].mean:.1f}")
    return lines + _convergence_lines(None if convergence is None else Path(convergence))


def _convergence_lines(path: Path | None) -> list[str]:
    from benchmarks.sweep.convergence import convergence_markdown, read_records

    if path is None or not path.is_file():
        return ["", "Convergence: not checked for these rows (`--check-convergence` reruns the "
                "grid with twice the steps and compares)."]
    md = convergence_markdown(read_records(path))
    return ["", "Convergence check: " + md] if md else []
