"""The plan for people: a table (:func:`format_plan`, what the CLI prints) and a figure.

Both take the rows as :func:`convpeft.planner.plan` returns them (best first).
The table gives the peak broken down by category in MiB (what to shrink when a
configuration misses) and says which rows were capped or start at batch 2; the figure shows the
max batch over rank per method (dashed / dotted: lean). Matplotlib is imported only when
plotting, so planning does not need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .budget import format_bytes
from .planning import PlanRow

_CATS = (("params", "params"), ("grads", "grads"), ("optimizer", "optim"),
         ("activations", "activ"), ("temporaries", "temps"), ("buffers", "bufs"),
         ("scratch", "scratch"))


def format_plan(rows: Sequence[PlanRow]) -> str:
    """A readable table of ``rows`` (as :func:`plan` returns them), with a header line."""
    if not rows:
        return "no configuration planned"
    r0 = rows[0]
    asked = r0.max_batch is None
    head = (f"{r0.model} at {r0.resolution}x{r0.resolution}, budget {format_bytes(r0.budget)} "
            f"({r0.budget:,} bytes), BN {r0.bn}, {r0.optimizer}; predicted device peak of one "
            f"update (MiB; {r0.memory_model or 'tensor-level'})")
    if asked:
        head += f", batch {r0.batch}"
    verified = any(r.verification is not None for r in rows)
    cols = (f"{'configuration':<23}{'fits' if asked else 'max batch':>10}{'peak':>9}"
            f"{'headroom':>10}" + "".join(f"{short:>8}" for _, short in _CATS)
            + f"{'GFLOP/img':>10}{'trainable':>12}"
            + (f"  {'measured at batch (next)':<28}" if verified else ""))
    lines = [head, cols]
    for r in rows:
        if asked:
            first = "yes" if r.fits else "no"
        else:
            first = f">={r.max_batch}" if r.capped else str(r.max_batch)
        mib = [r.memory_by_category.get(c, 0) / 2**20 for c, _ in _CATS]
        line = (f"{r.label:<23}{first:>10}{r.memory_peak / 2**20:>9.1f}"
                f"{r.headroom / 2**20:>10.1f}" + "".join(f"{v:>8.1f}" for v in mib)
                + f"{r.flops_per_sample / 1e9:>10.3f}{r.trainable_params:>12,}")
        v = r.verification
        if v is not None:
            at = v.batch if v.fits else min(v.measured)
            text = f"{v.measured[at] / 2**20:.1f} MiB at {at}"
            if v.next_fits is not None:
                text += (f" ({v.measured[at + 1] / 2**20:.1f} at {at + 1}: "
                         f"{'fits too' if v.next_fits else 'over'})")
            line += f"  {text}"
        lines.append(line)
    if not asked:
        none = [r.label for r in rows if r.max_batch == 0]
        if none:
            lines.append("does not fit even at the smallest batch (figures at that batch): "
                         + ", ".join(none))
        two = [r.label for r in rows if r.min_batch > 1]
        if two:
            lines.append("smallest batch 2 (train-mode BN cannot take batch 1 on a 1x1 feature "
                         f"map): {', '.join(two)}")
        capped = [r.label for r in rows if r.capped]
        if capped:
            lines.append(f"larger batches may fit too (search capped at max batch): "
                         f"{', '.join(capped)}")
    unmeasured = list(dict.fromkeys(k for r in rows for k in r.unmeasured_ops))
    if unmeasured:
        from convpeft.profiler.scratch import UNMEASURED_MARGIN

        lines.append(f"op kinds the device model never measured, planned with a margin of "
                     f"{UNMEASURED_MARGIN:g}x their largest operand instead of a fitted scratch: "
                     f"{', '.join(unmeasured)} (--verify measures the planned batch on the device)")
    if verified:
        stepped = [r.label for r in rows if r.verification is not None and r.verification.steps]
        lines.append(f"measured: one real update per batch on {r0.device} "
                     f"({rows[0].verification.criterion}); max batch is the largest measured to "
                     "fit" + (f"; stepped down: {', '.join(stepped)}" if stepped else ""))
    return "\n".join(lines)


def plot_plan(rows: Iterable[PlanRow], path: str | Path) -> Path:
    """Max batch against rank, one line per ranked method (dashed: lean), a horizontal line per
    method without a rank (dotted: lean), written to ``path`` (format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convpeft.methods import get_method, list_methods

    rows = list(rows)
    if not rows:
        raise ValueError("nothing to plot: no rows")
    if any(r.max_batch is None for r in rows):
        raise ValueError("rows from a fixed batch have no max batch to plot; plan without batch")
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(list_methods())}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranks = sorted({r.rank for r in rows if r.rank is not None})
    for lean in (False, True):
        for method in dict.fromkeys(r.method for r in rows if r.lean == lean):
            sel = [r for r in rows if r.method == method and r.lean == lean]
            label = get_method(method).label + (", lean" if lean else "")
            color = colors.get(method)
            if sel[0].rank is None:
                ax.axhline(sel[0].max_batch, color=color, linestyle=":" if lean else "-.",
                           linewidth=1.2, label=f"{label} (no rank)")
            else:
                sel.sort(key=lambda r: r.rank)
                ax.plot([r.rank for r in sel], [r.max_batch for r in sel], color=color,
                        linestyle="--" if lean else "-", marker="o",
                        markerfacecolor="white" if lean else color, label=label)
    if ranks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("largest batch that fits")
    ax.set_ylim(bottom=0)
    r0 = rows[0]
    capped = " (capped at max batch)" if any(r.capped for r in rows) else ""
    ax.set_title(f"{r0.model}, {r0.resolution}x{r0.resolution}, budget "
                 f"{format_bytes(r0.budget)}, BN {r0.bn}, {r0.optimizer}{capped}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
