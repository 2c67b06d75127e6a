"""findings.md's section "The study's claims, reproduced and corrected", computed from rows.

The study (arXiv 2507.23536) reports up to 95% fewer FLOPs per LoRA update. Its setup, as the
``study`` preset of the rank sweep reproduces it: adapters on the ``standard`` (``groups == 1``)
convs only, what peft accepts, and FLOPs counted by torch's ``FlopCounterMode``, which charges a
depthwise conv's weight gradient as dense. Full FT computes those gradients and the adapters do
not, so only full FT's figure is inflated. For each (model, task, batch, method, rank) the
section sets side by side, from the rows:

* FLOPs of one update (forward + backward) saved vs full FT: adapters on standard convs counted
  the study's way (``flops_torch``) and correctly (ours), adapters on every conv both ways;
* peak memory of one update saved vs full FT's plain peak (same batch, BN policy): adapters on
  standard convs and on every conv, plain and lean (``--lean`` rows).

Full FT rows of either target are the reference (its cost does not depend on the target).
Where the rows lack a configuration the section prints the exact command that adds it to the
same ``--out`` (the rows' models, methods, ranks, batch and resolution).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from benchmarks.common import MIB, method_label, num, rank_of, target_of, variant_of

ADAPTERS = ("lora", "dora")
STUDY_TARGET = "standard"
OUR_TARGET = "conv"
TITLE = "The study's claims, reproduced and corrected"
STUDY_PRESET = {"batch_size": 32, "resolution": 224}  # what --preset study runs at
_FIELDS = {"ours": lambda r: _sum(num(r.get("flops_forward")), num(r.get("flops_backward"))),
           "torch": lambda r: num(r.get("flops_torch")),
           "peak": lambda r: num(r.get("memory_peak"))}


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _saving(x: float | None, ref: float | None) -> float | None:
    return None if x is None or not ref else 1 - x / ref


def _setup(r: dict) -> tuple:
    """What a cost depends on besides the method: model, data, task, batch, input, stem, BN."""
    return (r["model"], r.get("dataset"), r["task"], num(r.get("batch_size")),
            num(r.get("resolution")), bool(r.get("small_input")), r.get("bn"))


def _means(rows: Sequence[dict]) -> dict[tuple, dict[str, float]]:
    """Mean of each cost per (setup, method, rank, target, variant) over the ok rows' seeds
    (full FT's target is folded: its cost does not depend on it)."""
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") != "ok" or variant_of(r) not in ("plain", "lean"):
            continue
        target = None if r["method"] == "full" else target_of(r)
        k = (_setup(r), r["method"], rank_of(r), target, variant_of(r))
        for name, fn in _FIELDS.items():
            v = fn(r)
            if v is not None:
                acc[k][name].append(v)
    return {k: {n: sum(v) / len(v) for n, v in d.items() if v} for k, d in acc.items()}


def study_claims(rows: Sequence[dict]) -> list[dict]:
    """One record per (setup, adapter method, rank) with rows on standard convs or every conv
    and a full-FT reference: the FLOP and memory savings vs full FT (None where the rows lack
    that configuration). Keys: ``flops_study`` (standard convs, torch's counter),
    ``flops_correct`` (standard, ours), ``flops_conv`` / ``flops_conv_torch`` (every conv),
    ``mem_<target>_<variant>`` for target standard/conv and variant plain/lean."""
    m = _means(rows)
    out = []
    # setups and methods by name, ranks by value (as text, 16 would sort before 2)
    keys = sorted({(s, meth, rank) for (s, meth, rank, _, _) in m
                   if meth in ADAPTERS and rank is not None},
                  key=lambda k: (str(k[0]), k[1], int(k[2])))
    for setup, method, rank in keys:
        full = m.get((setup, "full", None, None, "plain"), {})
        if not full:
            continue

        def get(target: str, variant: str, field: str, setup=setup, method=method, rank=rank):
            return m.get((setup, method, rank, target, variant), {}).get(field)

        rec = dict(model=setup[0], dataset=setup[1], task=setup[2], batch_size=setup[3],
                   resolution=setup[4], bn=setup[6], method=method, rank=rank,
                   full_peak=full.get("peak"),
                   flops_study=_saving(get(STUDY_TARGET, "plain", "torch"), full.get("torch")),
                   flops_correct=_saving(get(STUDY_TARGET, "plain", "ours"), full.get("ours")),
                   flops_conv=_saving(get(OUR_TARGET, "plain", "ours"), full.get("ours")),
                   flops_conv_torch=_saving(get(OUR_TARGET, "plain", "torch"),
                                            full.get("torch")))
        for target in (STUDY_TARGET, OUR_TARGET):
            for variant in ("plain", "lean"):
                rec[f"mem_{target}_{variant}"] = _saving(get(target, variant, "peak"),
                                                         full.get("peak"))
        out.append(rec)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _range(recs: Sequence[dict], field: str) -> str:
    vals = [r[field] for r in recs if r[field] is not None]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return _pct(lo) if abs(hi - lo) < 5e-4 else f"{_pct(lo)} to {_pct(hi)}"


def commands(rows: Sequence[dict], recs: Sequence[dict], out: str = "OUT") -> list[str]:
    """The sweeps these rows lack for the section's every column, as exact commands writing
    into ``out``: the study's setup itself, adapters on every conv, and the lean twins."""
    base = f"python -m benchmarks.rank_sweep --preset study --out {out}"
    std = [r for r in rows if r.get("status") == "ok" and r.get("method") in ADAPTERS
           and target_of(r) == STUDY_TARGET]
    if not std or not recs:  # the whole comparison: the study's setup and its three twins
        return [base + flags for flags in ("", " --target conv", " --lean",
                                           " --target conv --lean")]
    models = ",".join(dict.fromkeys(r["model"] for r in std))
    methods = ",".join(["full", *dict.fromkeys(r["method"] for r in std)])
    ranks = ",".join(str(k) for k in sorted({rank_of(r) for r in std}))
    grid = f" --models {models} --methods {methods} --ranks {ranks}"
    for field, flag in (("batch_size", "--batch-size"), ("resolution", "--resolution")):
        vals = {num(r.get(field)) for r in std} - {None}
        if len(vals) == 1 and (v := int(vals.pop())) != STUDY_PRESET[field]:
            grid += f" {flag} {v}"
    missing = []
    for flags, field in (("", "mem_standard_plain"), (" --target conv", "flops_conv"),
                         (" --lean", "mem_standard_lean"),
                         (" --target conv --lean", "mem_conv_lean")):
        if all(r[field] is None for r in recs):
            missing.append(base + grid + flags)
    return missing


STUDY_OUT = "results/study"
"""Where findings.md suggests running the study's comparison when the rows at hand are another
grid's (the default sweep's, say)."""


def _holds_other_rows(rows: Sequence[dict]) -> bool:
    """Whether ``rows`` hold updates at another batch or resolution than the study preset's."""
    ok = [r for r in rows if r.get("status") == "ok"]
    return any(num(r.get("batch_size")) != STUDY_PRESET["batch_size"]
               or num(r.get("resolution")) != STUDY_PRESET["resolution"] for r in ok)


def study_lines(rows: Sequence[dict], out: str = "OUT", number: int | None = None) -> list[str]:
    """The section's markdown lines (title included, numbered ``number`` if given)."""
    recs = study_claims(rows)
    lines = [f"## {'' if number is None else f'{number}. '}{TITLE}", "",
             "The study counted the FLOPs of an update with torch's `FlopCounterMode`, which "
             "charges a depthwise conv's weight gradient as if the conv were dense, and adapted "
             "only the standard (`groups=1`) convs peft accepts. Full FT computes the depthwise "
             "weight gradients and such adapters do not, so only full FT's count is inflated "
             "and the saving looks huge. Counted correctly (ours: depthwise convs as they run) "
             "the same update saves far less; with adapters on every conv (ours) torch's "
             "counter shows almost no saving instead. Memory: peak of one update vs full FT's "
             "plain peak at the rows' batch; lean = `--lean` rows.", ""]
    if not any(r["flops_correct"] is not None for r in recs):
        # a folder of its own: the study's 224x224 grid mixed into these rows' folder would
        # be drawn and summarised with them
        todo = commands(rows, recs, STUDY_OUT if _holds_other_rows(rows) else out)
        lines += ["These rows hold no LoRA/DoRA update with adapters on standard convs only "
                  "next to a full-FT reference. Run the study's setup (cost only, offline), "
                  "then the comparison's other columns, all four into one folder of their own; "
                  "its findings.md then sets the study's number, the correct one and ours side "
                  "by side:", "", *(f"    {c}" for c in todo), ""]
        return lines
    todo = commands(rows, recs, out)
    models = dict.fromkeys(r["model"] for r in recs)
    for model in models:
        mr = [r for r in recs if r["model"] == model]
        batches = ", ".join(f"{int(b)} x {int(res)}x{int(res)}"
                            for b, res in dict.fromkeys((r["batch_size"], r["resolution"])
                                                        for r in mr))
        lines.append(
            f"- **{model}** (batch {batches}): FLOP saving as the study counts it (standard "
            f"convs, torch's counter) {_range(mr, 'flops_study')}; counted correctly "
            f"{_range(mr, 'flops_correct')}; adapters on every conv {_range(mr, 'flops_conv')} "
            f"correctly, {_range(mr, 'flops_conv_torch')} by torch's counter. Peak-memory "
            f"saving: standard convs {_range(mr, 'mem_standard_plain')} plain, "
            f"{_range(mr, 'mem_standard_lean')} lean; every conv "
            f"{_range(mr, 'mem_conv_plain')} plain, {_range(mr, 'mem_conv_lean')} lean.")
    lines += ["", "Saving vs full FT per configuration (n/a: not in these rows):", "",
              "| model | batch | method | rank | FLOPs: study (standard, torch) | standard, "
              "correct | every conv, correct | every conv, torch | full FT peak [MiB] | "
              "memory: standard | standard, lean | every conv | every conv, lean |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        peak = "n/a" if r["full_peak"] is None else f"{r['full_peak'] / MIB:.1f}"
        lines.append(
            f"| {r['model']} | {int(r['batch_size'])} | {method_label(r['method'])} | "
            f"{r['rank']} | {_pct(r['flops_study'])} | {_pct(r['flops_correct'])} | "
            f"{_pct(r['flops_conv'])} | {_pct(r['flops_conv_torch'])} | {peak} | "
            f"{_pct(r['mem_standard_plain'])} | {_pct(r['mem_standard_lean'])} | "
            f"{_pct(r['mem_conv_plain'])} | {_pct(r['mem_conv_lean'])} |")
    if todo:
        lines += ["", "To fill the n/a columns, run into the same folder:", "",
                  *(f"    {c}" for c in todo)]
    lines.append("")
    return lines
