"""Conv-aware GaLore: gradient low-rank projection for 4-D conv weights, on top of galore-torch.

GaLore (Zhao et al. 2024) keeps Adam's moments in a rank-``r`` subspace of each weight's
gradient: every ``update_proj_gap`` steps an SVD of the gradient ``G (m x n)`` gives a projection
``P``; in between, Adam runs on the projected gradient and its update is projected back.
galore-torch 1.0 only handles 2-D weights (a 4-D conv weight makes its projector call
``torch.diag`` on a 3-D tensor and raise). This module makes it work on CNNs while *reusing*
galore-torch: its :class:`~galore_torch.galore_projector.GaLoreProjector` does the SVD and the
projections, and :class:`galore_torch.GaLoreAdamW`'s own ``step`` does the Adam arithmetic.

**The reshape.** A conv weight ``W: (C_out, C_in/g, k_h, k_w)`` is optimized as the matrix
``W.view(C_out, C_in/g * k_h * k_w)`` -- rows are output filters, the layout ``nn.Conv2d`` uses
for its im2col matmul, so no data moves (the 2-D view shares the weight's storage). So

===================  ==========================  ==================================
layer                weight                      matrix ``m x n``
===================  ==========================  ==================================
standard 3x3         ``(C_out, C_in, 3, 3)``     ``C_out x 9 C_in``
pointwise 1x1        ``(C_out, C_in, 1, 1)``     ``C_out x C_in``
grouped (g groups)   ``(C_out, C_in/g, 3, 3)``   ``C_out x 9 C_in/g``
depthwise            ``(C, 1, 3, 3)``            ``C x 9``
linear               ``(out, in)``               ``out x in`` (unchanged)
===================  ==========================  ==================================

With ``proj_type="std"`` galore-torch projects the *smaller* side: for ``m >= n`` the moments are
``m x r`` and the projection ``r x n``; for ``m < n`` the moments are ``r x n`` and the
projection ``m x r``. Either way the state is ``O(r (m + n))`` instead of Adam's ``2 m n``.

**Fallback.** When ``rank >= min(m, n)`` the "projection" is a full-rank rotation that saves
nothing (and costs an SVD), so that weight goes to a plain AdamW group instead. This happens to
every depthwise conv as soon as ``rank >= k_h * k_w`` (9 for 3x3), and to the first conv of most
nets (``3 * 9 = 27`` columns). :meth:`ConvGaLoreAdamW.summary` lists these.

**Plain params.** Everything that is not a selected weight -- BN affine params, biases, the
classifier head unless ``target`` selects linear layers -- is optimized by plain AdamW in the
same optimizer object (galore-torch's step without projection).

**Classifier head.** ``target="conv"`` (the default) leaves the ``nn.Linear`` head to plain
AdamW: its state is tiny (``num_classes x features``), and a freshly initialized head for a new
task is exactly where a rank-``r`` gradient subspace would hurt most. ``target="all"`` (or
``"linear"``) projects it like any other matrix; with 10 classes its smaller side is 10, so it
falls back for ``rank >= 10``.

Update rule (galore-torch's AdamW): ``p -= lr * bias_corr * scale * P^T (m_hat / (sqrt(v_hat) +
eps))`` for projected weights (``scale = 1`` for plain ones), then decoupled weight decay
``p -= lr * wd * p``. Note galore-torch's default ``eps`` is ``1e-6`` (torch's AdamW: ``1e-8``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector
from torch import nn

from convpeft.flops import matmul_flops, svd_flops
from convpeft.layer_kinds import check_target, layer_kind, select_layers

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
"""Projection types of galore-torch's ``GaLoreProjector``."""

BASES = ("adamw",)
"""Base optimizers GaLore can wrap here (galore-torch's AdamW; its 8-bit and Adafactor variants
need extra packages / are not wired up)."""

ROLES = ("galore", "fallback", "plain")

# Adam arithmetic per moment element in galore-torch's AdamW step: exp_avg mul + fused add (3),
# exp_avg_sq mul + addcmul (4), sqrt, + eps, divide (3).
_ADAM_FLOPS_PER_MOMENT = 10

ParamsArg = nn.Module | Iterable[Any]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D matrix a weight of ``shape`` is projected as: ``(shape[0], prod(shape[1:]))``.

    ``(C_out, C_in/g, k_h, k_w) -> (C_out, C_in/g*k_h*k_w)``; depthwise ``(C, 1, k, k) ->
    (C, k*k)``; 2-D shapes are unchanged.
    """
    if len(shape) < 2:
        raise ValueError(f"GaLore needs a weight with >= 2 dims, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


def _side(m: int, n: int, proj_type: str) -> str:
    """Which side galore-torch projects: 'right' (moments m x r), 'left' (r x n) or 'full'."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def projected_shapes(
    m: int, n: int, rank: int, proj_type: str = "std"
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``(moment shape, [projection matrix shapes])`` galore-torch keeps for an ``m x n`` matrix.

    E.g. ``std`` with ``m >= n``: moments ``(m, r)``, projection ``[(r, n)]``.
    """
    side = _side(m, n, proj_type)
    if side == "right":
        return (m, rank), [(rank, n)]
    if side == "left":
        return (rank, n), [(m, rank)]
    return (rank, rank), [(m, rank), (rank, n)]


def _projection_matmul_flops(m: int, n: int, rank: int, proj_type: str) -> int:
    """FLOPs of projecting an ``m x n`` gradient down and the ``m x n`` update back up."""
    side = _side(m, n, proj_type)
    r = rank
    if side == "right":  # G @ P^T: (m,n)(n,r); back: (m,r)(r,n)
        return matmul_flops(m, n, r) + matmul_flops(m, r, n)
    if side == "left":  # P^T @ G: (r,m)(m,n); back: (m,r)(r,n)
        return matmul_flops(r, m, n) + matmul_flops(m, r, n)
    # full: A^T G B^T = (r,m)(m,n) then (r,n)(n,r); back: A (m,r)(r,r) then (m,r)(r,n)
    return (matmul_flops(r, m, n) + matmul_flops(r, n, r)
            + matmul_flops(m, r, r) + matmul_flops(m, r, n))


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class GaLoreRow:
    """One optimized parameter. ``state_bytes`` is what this optimizer holds for it after its
    first step; ``adamw_state_bytes`` what plain AdamW would (two moments of the full shape)."""

    name: str
    kind: str | None  # layer kind of its module (convpeft.layer_kinds) or None
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


# --------------------------------------------------------------------------------------------
# Building the param groups


def _check_options(rank: Any, update_proj_gap: Any, proj_type: Any, scale: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"GaLore rank must be an integer >= 1, got {rank!r}")
    if (isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, numbers.Integral)
            or update_proj_gap < 1):
        raise ValueError(f"update_proj_gap must be an integer >= 1, got {update_proj_gap!r}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"unknown proj_type {proj_type!r}; use one of {', '.join(PROJ_TYPES)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
        raise ValueError(f"GaLore scale must be a number > 0, got {scale!r}")


_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
_OWN_KEYS = ("params", "names", "galore", *_GALORE_KEYS)


@dataclass
class _Entry:
    name: str
    param: torch.Tensor
    kind: str | None
    candidate: bool


def _entries_from_model(
    model: nn.Module, target: Any, exclude: Iterable[str] | None
) -> list[_Entry]:
    # select_layers decides targets by layer kind; a selected layer contributes its weight
    selected = {}
    for _name, module in select_layers(model, target, exclude):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            selected[id(w)] = layer_kind(module)
    kinds: dict[int, str | None] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            kinds.setdefault(id(p), layer_kind(module))
    return [
        _Entry(name, p, kinds.get(id(p)), id(p) in selected)
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


def _shape_rule(target: Any) -> Callable[[torch.Tensor], bool]:
    """Without a model there are no layer kinds, only shapes: 4-D (>= 3-D) = conv, 2-D = linear."""
    if target == "conv":
        return lambda p: p.dim() >= 3
    if target == "linear":
        return lambda p: p.dim() == 2
    if target == "all":
        return lambda p: p.dim() >= 2
    raise ValueError(
        f"target={target!r} needs a model (layer kinds); with parameters or param groups use "
        "'conv' (4-D weights), 'linear' (2-D), 'all', or mark groups with 'galore': True"
    )


def _user_groups(params: Iterable[Any], target: Any) -> list[tuple[dict, list[_Entry]]]:
    """Split param groups / a param iterable into ``(options, entries)`` per user group."""
    items = list(params)
    if not items:
        raise ValueError("galore_optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    rule: Callable[[torch.Tensor], bool] | None = None
    out = []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict):
            raise TypeError("mix of dicts and parameters; pass param groups or parameters")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        names = list(g.get("names", []))
        marker = g.get("galore", True if "rank" in g else None)
        entries = []
        for j, item in enumerate(ps):
            if isinstance(item, tuple):
                name, p = item
            else:
                p = item
                name = names[j] if j < len(names) else f"group{gi}.param{j}"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param group {gi} holds a {type(p).__name__}, not a tensor")
            if marker is None:
                rule = rule or _shape_rule(target)
                cand = rule(p)
            else:
                cand = bool(marker) and p.dim() >= 2
            kind = ("conv" if p.dim() >= 3 else "linear") if p.dim() >= 2 else None
            entries.append(_Entry(name, p, kind, cand))
        opts = {k: v for k, v in g.items() if k not in _OWN_KEYS}
        opts.update({k: g[k] for k in _GALORE_KEYS if k in g})
        out.append((opts, entries))
    return out


# --------------------------------------------------------------------------------------------
# The optimizer


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _compact(value: Any) -> Any:
    """A compact copy of a projection matrix: galore-torch returns slices of the SVD's U/Vh,
    which would keep the whole ``m x min(m,n)`` factor alive (not low-rank memory)."""
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    return value


class ConvGaLoreAdamW(GaLoreAdamW):
    """galore-torch's GaLoreAdamW, made to work on conv weights (see the module docstring).

    Param groups carry ``role``: ``"galore"`` groups (with ``rank``, ``update_proj_gap``,
    ``scale``, ``proj_type``) hold weights with ``rank < min(m, n)``; ``"fallback"`` groups the
    targeted weights where ``rank >= min(m, n)``; ``"plain"`` groups everything else. Groups also
    carry torch's ``param_names``. As in galore-torch, a group is projected iff it has a
    ``rank`` key; groups added later with ``add_param_group`` should use
    :func:`galore_optimizer`'s rules (without ``rank`` they are plain AdamW).

    State of a projected weight (all tensors, so ``state_dict`` is plain and loads with
    ``torch.load(weights_only=True)``): ``step`` (int), ``exp_avg``/``exp_avg_sq`` of the
    projected shape (``m x r`` or ``r x n``) and ``ortho_matrix`` (the projection, ``r x n`` or
    ``m x r``; a list of both for ``proj_type="full"``).
    """

    def __init__(
        self,
        params: ParamsArg,
        *,
        rank: int = 4,
        lr: float = 1e-3,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        target: Any = "conv",
        weight_decay: float = 0.0,
        base: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        exclude: Iterable[str] | None = None,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"unknown base optimizer {base!r}; supported: {', '.join(BASES)}")
        _check_options(rank, update_proj_gap, proj_type, scale)
        if isinstance(params, nn.Module):
            check_target(target)
            user = [({}, _entries_from_model(params, target, exclude))]
        else:
            if exclude is not None:
                raise ValueError("exclude needs a model (it matches qualified layer names)")
            user = _user_groups(params, target)
        if not any(e.candidate for _, es in user for e in es):
            raise ValueError(
                f"no trainable parameter matches GaLore target {target!r} (targets are the "
                "weights of the selected layers, >= 2-D); check target/exclude or requires_grad"
            )

        groups: list[dict[str, Any]] = []
        # keyed by param name (not id) so they survive deepcopy, e.g. the profiler's meta copy
        self._kinds: dict[str, str | None] = {}
        self._order: dict[str, int] = {}  # summary rows follow the order params were given
        defaults = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                    "proj_type": proj_type}
        for opts, entries in user:
            gal = {**defaults, **{k: opts[k] for k in _GALORE_KEYS if k in opts}}
            _check_options(gal["rank"], gal["update_proj_gap"], gal["proj_type"], gal["scale"])
            other = {k: v for k, v in opts.items() if k not in _GALORE_KEYS}
            split: dict[str, list[_Entry]] = {r: [] for r in ROLES}
            for e in entries:
                self._kinds[e.name] = e.kind
                self._order.setdefault(e.name, len(self._order))
                if not e.candidate:
                    split["plain"].append(e)
                elif gal["rank"] < min(matrix_shape(e.param.shape)):
                    split["galore"].append(e)
                else:
                    split["fallback"].append(e)
            for role in ROLES:
                if not split[role]:
                    continue
                g = {"params": [(e.name, e.param) for e in split[role]], **other, "role": role}
                if role == "galore":
                    g.update(gal)  # "rank" in a group is what makes galore-torch project
                groups.append(g)
        self._target_repr = target if isinstance(target, str) else repr(target)
        self._rank = int(rank)
        self._proj_type = proj_type
        self._scale = float(scale)
        self._update_proj_gap = int(update_proj_gap)
        self.last_step_refreshed = False
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         no_deprecation_warning=True)
        if not self._galore_groups():
            warnings.warn(
                f"GaLore rank {rank} >= the smaller matrix side of every targeted weight: "
                "nothing is projected, this is plain AdamW", stacklevel=2)

    _EXTRA_ATTRS = ("_kinds", "_order", "_target_repr", "_rank", "_proj_type", "_scale",
                    "_update_proj_gap", "last_step_refreshed")

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles/deep-copies only defaults, state and param_groups; keep the
        # summary metadata too (the profiler deep-copies optimizers onto the meta device)
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._EXTRA_ATTRS}}

    # -- properties the profiler reads ---------------------------------------------------------

    @property
    def update_proj_gap(self) -> int:
        """Steps between projection refreshes (the smallest over galore groups)."""
        gaps = [g["update_proj_gap"] for g in self._galore_groups()]
        return min(gaps) if gaps else self._update_proj_gap

    @update_proj_gap.setter
    def update_proj_gap(self, gap: int) -> None:
        _check_options(1, gap, "std", 1.0)
        self._update_proj_gap = int(gap)
        for g in self._galore_groups():
            g["update_proj_gap"] = int(gap)

    def _galore_groups(self) -> list[dict[str, Any]]:
        # galore-torch's criterion: a group with a "rank" key is projected
        return [g for g in self.param_groups if "rank" in g]

    @staticmethod
    def _will_refresh(state: dict[str, Any], group: dict[str, Any]) -> bool:
        # galore-torch's rule: no projection yet, or step % update_proj_gap == 0
        return (state.get("ortho_matrix") is None
                or state.get("step", 0) % group["update_proj_gap"] == 0)

    def refreshes_next_step(self) -> bool:
        """Whether the next ``step()`` recomputes (SVD) any projection, assuming every projected
        weight gets a gradient."""
        return any(self._will_refresh(self.state.get(p, {}), g)
                   for g in self._galore_groups() for p in g["params"])

    def projection_refresh_flops(self) -> int:
        """FLOPs of ONE refresh of all projections: a thin SVD of each projected ``m x n``
        gradient (:func:`convpeft.flops.svd_flops`). The projection matmuls are not included."""
        return sum(svd_flops(*matrix_shape(p.shape))
                   for g in self._galore_groups() for p in g["params"])

    def amortized_refresh_flops(self) -> float:
        """Refresh FLOPs per step, averaged over each group's ``update_proj_gap``."""
        return sum(svd_flops(*matrix_shape(p.shape)) / g["update_proj_gap"]
                   for g in self._galore_groups() for p in g["params"])

    def step_flops(self) -> int:
        """FLOPs of one ordinary step's projection matmuls (gradient down + update up)."""
        return sum(_projection_matmul_flops(*matrix_shape(p.shape), g["rank"], g["proj_type"])
                   for g in self._galore_groups() for p in g["params"])

    def elementwise_flops(self) -> int:
        """Elementwise arithmetic of one step (not in the 2-FLOPs/MAC figures): 10 per moment
        element (Adam), 2 per weight element (``p.add_``), +1 for GaLore's ``scale``, +2 with
        weight decay."""
        total = 0
        for g in self.param_groups:
            wd = 2 if g["weight_decay"] > 0 else 0
            for p in g["params"]:
                if "rank" in g:
                    mom, _ = projected_shapes(*matrix_shape(p.shape), g["rank"], g["proj_type"])
                    total += _ADAM_FLOPS_PER_MOMENT * math.prod(mom) + (3 + wd) * p.numel()
                else:
                    total += (_ADAM_FLOPS_PER_MOMENT + 2 + wd) * p.numel()
        return total

    # -- memory ---------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of all optimizer state tensors now (each storage counted once, whole)."""
        seen: set[Any] = set()
        total = 0
        for st in self.state.values():
            for t in _tensors(st):
                s = t.untyped_storage()
                key = (t.device, s.data_ptr()) if s.data_ptr() else id(t)
                if key in seen:
                    continue
                seen.add(key)
                total += s.nbytes()
        return total

    def summary(self) -> GaLoreSummary:
        """Per-param table: role, rank and the state bytes it will hold after its first step."""
        rows = []
        for g in self.param_groups:
            role = "galore" if "rank" in g else g.get("role", "plain")
            names = g.get("param_names") or [f"param{i}" for i in range(len(g["params"]))]
            for name, p in zip(names, g["params"], strict=True):
                el = p.element_size()
                adamw = 2 * p.numel() * el
                mshape = matrix_shape(p.shape) if role != "plain" else None
                if role == "galore":
                    mom, projs = projected_shapes(*mshape, g["rank"], g["proj_type"])
                    state = (2 * math.prod(mom) + sum(math.prod(s) for s in projs)) * el
                    rank = int(g["rank"])
                else:
                    state, rank = adamw, None
                row = GaLoreRow(name, self._kinds.get(name), tuple(p.shape), mshape, role, rank,
                                int(state), int(adamw))
                rows.append((self._order.get(name, 0), row))
        rows = [r for _, r in sorted(rows, key=lambda t: t[0])]
        return GaLoreSummary(rows, self._rank, self.update_proj_gap, self._proj_type,
                             self._scale, self._target_repr)

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update. Projected weights are handed to galore-torch's step as 2-D views (sharing
        storage), with a ``GaLoreProjector`` rebuilt from the ``ortho_matrix`` tensor in state."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        real_groups, real_state = self.param_groups, self.state
        view_groups: list[dict[str, Any]] = []
        view_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        projected: list[tuple[dict[str, Any], bool]] = []  # (state, refreshes)
        for g in real_groups:
            if "rank" not in g:
                view_groups.append(g)
                for p in g["params"]:
                    if p.grad is not None:
                        view_state[p] = real_state[p]
                continue
            views = []
            for p in g["params"]:
                if p.grad is None:
                    views.append(p)  # skipped by galore-torch, as any grad-less param
                    continue
                m, n = matrix_shape(p.shape)
                st = real_state[p]
                refresh = self._will_refresh(st, g)
                # upstream keeps its projector object in state; we keep only the tensor and
                # rebuild the (stateless apart from it) projector for each step
                proj = GaLoreProjector(g["rank"], update_proj_gap=g["update_proj_gap"],
                                       scale=g["scale"], proj_type=g["proj_type"])
                proj.ortho_matrix = st.pop("ortho_matrix", None)
                st["projector"] = proj
                if p.is_contiguous():
                    v = p.detach().view(m, n)  # shares storage: upstream's p.add_ updates p
                else:  # e.g. channels_last: work on a copy, written back below
                    v = p.detach().reshape(m, n).clone()
                    copy_back.append((p, v))
                v.grad = p.grad.reshape(m, n)
                views.append(v)
                view_state[v] = st  # the same dict: upstream's updates land in our state
                projected.append((st, refresh))
            view_groups.append({**g, "params": views})

        self.param_groups, self.state = view_groups, view_state
        try:
            # galore-torch's AdamW.step, unwrapped from torch's per-class step hooks (so hooks on
            # this optimizer fire once, around this method) and from no_grad (we are inside it)
            inspect.unwrap(GaLoreAdamW.step)(self)
        finally:
            self.param_groups, self.state = real_groups, real_state
            for st, refresh in projected:
                proj = st.pop("projector", None)
                if proj is not None:
                    ortho = proj.ortho_matrix
                    st["ortho_matrix"] = _compact(ortho) if refresh else ortho
        for p, v in copy_back:
            p.copy_(v.view_as(p))
        self.last_step_refreshed = any(r for _, r in projected)
        return loss


def galore_optimizer(
    model_or_param_groups: ParamsArg,
    *,
    rank: int = 4,
    lr: float = 1e-3,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target: Any = "conv",
    weight_decay: float = 0.0,
    base: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    exclude: Iterable[str] | None = None,
) -> ConvGaLoreAdamW:
    """GaLore-AdamW over a model or param groups, with conv weights projected as matrices.

    ``model_or_param_groups``:

    * an ``nn.Module``: its trainable params, named by qualified name; the weights of the layers
      ``convpeft.layer_kinds.select_layers(model, target, exclude)`` selects are projected,
      everything else (BN, biases, non-target layers) gets plain AdamW.
    * an iterable of tensors or ``(name, tensor)`` pairs: targets by shape -- ``target="conv"``
      projects >= 3-D tensors, ``"linear"`` 2-D ones, ``"all"`` both (kind targets such as
      ``"depthwise"`` need a model and raise).
    * a list of param-group dicts: ``"galore": True`` (or a ``"rank"`` key, galore-torch's
      convention) projects the group's >= 2-D params, ``"galore": False`` keeps it plain,
      neither applies the shape rule above. Groups may override ``rank``, ``update_proj_gap``,
      ``scale``, ``proj_type``, ``lr``, ``weight_decay``, ``betas``, ``eps`` and may give
      ``"names"`` (one per param) for the summary.

    Weights with ``rank >= min(matrix side)`` go to a plain "fallback" group (see
    ``summary()``). ``base`` must be ``"adamw"``. ``betas``/``eps``/``exclude`` are extras.

    Raises ``ValueError`` for rank < 1, update_proj_gap < 1, unknown proj_type/base/target,
    and when no trainable parameter matches ``target``.
    """
    return ConvGaLoreAdamW(
        model_or_param_groups, rank=rank, lr=lr, update_proj_gap=update_proj_gap, scale=scale,
        proj_type=proj_type, target=target, weight_decay=weight_decay, base=base, betas=betas,
        eps=eps, exclude=exclude,
    )
