"""What a GaLore optimizer projects and what that costs, computed from shapes alone.

:func:`summarize` gives one :class:`GaLoreRow` per parameter: its role (``"galore"``: projected;
``"fallback"``: targeted but ``rank >= min(m, n)``, so plain AdamW; ``"plain"``: not targeted),
and the optimizer-state bytes it holds after its first step next to plain AdamW's two full-shape
moments. The FLOP functions are the optimizer's share of an update, in convpeft's convention
(2 FLOPs per multiply-accumulate, :mod:`convpeft.core.flops`): the SVD of a refresh, the projection
matmuls of every step, and the elementwise Adam arithmetic.

Everything here is a cost model: it reads param-group shapes and settings, never the state
tensors, so it also answers for an optimizer that has not stepped yet (or lives on the meta
device). ``ConvGaLoreAdamW.state_bytes()`` measures the real tensors; the tests hold the two
equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from convpeft.core.flops import matmul_flops, svd_flops

from .projector import matrix_shape, projected_groups, projected_shapes, projection_side

ROLES = ("galore", "fallback", "plain")

# Adam arithmetic per moment element in galore-torch's AdamW step: exp_avg mul + fused add (3),
# exp_avg_sq mul + addcmul (4), sqrt, + eps, divide (3).
_ADAM_FLOPS_PER_MOMENT = 10

Groups = Sequence[dict[str, Any]]


@dataclass
class GaLoreRow:
    """One optimized parameter. ``state_bytes`` is what this optimizer holds for it after its
    first step; ``adamw_state_bytes`` what plain AdamW would (two moments of the full shape)."""

    name: str
    kind: str | None  # layer kind of its module (convpeft.core.layer_kinds) or None
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int] | None  # None for params that were never GaLore candidates
    role: str  # "galore" | "fallback" (rank >= min side) | "plain" (not targeted)
    rank: int | None  # projection rank for "galore" rows
    state_bytes: int
    adamw_state_bytes: int

    @property
    def projected(self) -> bool:
        return self.role == "galore"


@dataclass
class GaLoreSummary:
    """Which params GaLore projects, at what rank, and the optimizer state vs plain AdamW."""

    rows: list[GaLoreRow]
    rank: int
    update_proj_gap: int
    proj_type: str
    scale: float
    target: str = field(default="conv")

    @property
    def state_bytes(self) -> int:
        return sum(r.state_bytes for r in self.rows)

    @property
    def adamw_state_bytes(self) -> int:
        return sum(r.adamw_state_bytes for r in self.rows)

    @property
    def state_ratio(self) -> float:
        """GaLore state / plain-AdamW state (1.0 = saves nothing)."""
        return self.state_bytes / self.adamw_state_bytes if self.adamw_state_bytes else 1.0

    @property
    def projected(self) -> list[str]:
        return [r.name for r in self.rows if r.role == "galore"]

    @property
    def fallback(self) -> list[str]:
        """Targeted weights where ``rank >= min(m, n)``: plain AdamW, GaLore saves nothing."""
        return [r.name for r in self.rows if r.role == "fallback"]

    @property
    def plain(self) -> list[str]:
        return [r.name for r in self.rows if r.role == "plain"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: settings, totals and one dict per row."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["shape"] = list(r.shape)
            d["matrix_shape"] = list(r.matrix_shape) if r.matrix_shape else None
            d["projected"] = r.projected
            rows.append(d)
        return {
            "rank": self.rank, "update_proj_gap": self.update_proj_gap,
            "proj_type": self.proj_type, "scale": self.scale, "target": self.target,
            "state_bytes": self.state_bytes, "adamw_state_bytes": self.adamw_state_bytes,
            "state_ratio": self.state_ratio, "num_projected": len(self.projected),
            "num_fallback": len(self.fallback), "num_plain": len(self.plain),
            "fallback": self.fallback, "rows": rows,
        }

    def __str__(self) -> str:
        head = ("name", "kind", "shape", "matrix", "role", "rank", "state KiB", "AdamW KiB")
        body = []
        for r in self.rows:
            body.append((
                r.name, r.kind or "-", "x".join(map(str, r.shape)),
                "x".join(map(str, r.matrix_shape)) if r.matrix_shape else "-",
                r.role, str(r.rank) if r.rank is not None else "-",
                f"{r.state_bytes / 1024:.1f}", f"{r.adamw_state_bytes / 1024:.1f}",
            ))
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
                  for i, h in enumerate(head)]
        right = {5, 6, 7}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        lines = [
            f"GaLore rank={self.rank} proj_type={self.proj_type} scale={self.scale} "
            f"update_proj_gap={self.update_proj_gap} target={self.target}",
            fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body),
            f"projected {len(self.projected)}, fallback {len(self.fallback)} "
            f"(rank >= min matrix side: plain AdamW, no saving), plain {len(self.plain)}",
            f"optimizer state {self.state_bytes:,} B vs AdamW {self.adamw_state_bytes:,} B "
            f"(ratio {self.state_ratio:.3f})",
        ]
        return "\n".join(lines)


def summarize(
    groups: Groups, kinds: Mapping[str, str | None], *, rank: int, update_proj_gap: int,
    proj_type: str, scale: float, target: str,
) -> GaLoreSummary:
    """One row per parameter of ``groups`` (named by torch's ``param_names``), in the order of
    ``kinds`` (name -> layer kind, in the order the parameters were given)."""
    order = {name: i for i, name in enumerate(kinds)}
    rows = []
    for g in groups:
        role = "galore" if "rank" in g else g.get("role", "plain")
        names = g.get("param_names") or [f"param{i}" for i in range(len(g["params"]))]
        for name, p in zip(names, g["params"], strict=True):
            el = p.element_size()
            adamw = 2 * p.numel() * el
            mshape = matrix_shape(p.shape) if role != "plain" else None
            if role == "galore":
                mom, projs = projected_shapes(*mshape, g["rank"], g["proj_type"])
                state = (2 * math.prod(mom) + sum(math.prod(s) for s in projs)) * el
                r = int(g["rank"])
            else:
                state, r = adamw, None
            rows.append(GaLoreRow(name, kinds.get(name), tuple(p.shape), mshape, role, r,
                                  int(state), int(adamw)))
    rows.sort(key=lambda row: order.get(row.name, 0))
    return GaLoreSummary(rows, rank, update_proj_gap, proj_type, scale, target)


# --------------------------------------------------------------------------------------------
# FLOPs of the optimizer's share of an update (2 FLOPs per MAC)


def projection_matmul_flops(m: int, n: int, rank: int, proj_type: str) -> int:
    """FLOPs of projecting an ``m x n`` gradient down and the ``m x n`` update back up."""
    side = projection_side(m, n, proj_type)
    r = rank
    if side == "right":  # G @ P^T: (m,n)(n,r); back: (m,r)(r,n)
        return matmul_flops(m, n, r) + matmul_flops(m, r, n)
    if side == "left":  # P^T @ G: (r,m)(m,n); back: (m,r)(r,n)
        return matmul_flops(r, m, n) + matmul_flops(m, r, n)
    # full: A^T G B^T = (r,m)(m,n) then (r,n)(n,r); back: A (m,r)(r,r) then (m,r)(r,n)
    return (matmul_flops(r, m, n) + matmul_flops(r, n, r)
            + matmul_flops(m, r, r) + matmul_flops(m, r, n))


def refresh_flops(groups: Groups) -> int:
    """FLOPs of ONE refresh of all projections: a thin SVD of each projected ``m x n`` gradient
    (:func:`convpeft.core.flops.svd_flops`). The projection matmuls are not included."""
    return sum(svd_flops(*matrix_shape(p.shape))
               for g in projected_groups(groups) for p in g["params"])


def amortized_refresh_flops(groups: Groups) -> float:
    """Refresh FLOPs per step, averaged over each group's ``update_proj_gap``."""
    return sum(svd_flops(*matrix_shape(p.shape)) / g["update_proj_gap"]
               for g in projected_groups(groups) for p in g["params"])


def step_matmul_flops(groups: Groups) -> int:
    """FLOPs of one ordinary step's projection matmuls (gradient down + update up)."""
    return sum(projection_matmul_flops(*matrix_shape(p.shape), g["rank"], g["proj_type"])
               for g in projected_groups(groups) for p in g["params"])


def elementwise_flops(groups: Groups) -> int:
    """Elementwise arithmetic of one step (not in the 2-FLOPs/MAC figures): 10 per moment
    element (Adam), 2 per weight element (``p.add_``), +1 for GaLore's ``scale``, +2 with
    weight decay."""
    total = 0
    for g in groups:
        wd = 2 if g["weight_decay"] > 0 else 0
        for p in g["params"]:
            if "rank" in g:
                mom, _ = projected_shapes(*matrix_shape(p.shape), g["rank"], g["proj_type"])
                total += _ADAM_FLOPS_PER_MOMENT * math.prod(mom) + (3 + wd) * p.numel()
            else:
                total += (_ADAM_FLOPS_PER_MOMENT + 2 + wd) * p.numel()
    return total
