"""Conv-aware GaLore: gradient low-rank projection for 4-D conv weights, on top of galore-torch.

GaLore (Zhao et al. 2024) keeps Adam's moments in a rank-``r`` subspace of each weight's
gradient: every ``update_proj_gap`` steps an SVD of the gradient ``G (m x n)`` gives a projection
``P``; in between, Adam runs on the projected gradient and its update is projected back.
galore-torch 1.0 only handles 2-D weights. This package makes it work on CNNs while *reusing*
galore-torch, split as galore-torch splits:

* :mod:`.projector`: the matrix a conv weight is projected as, the shapes galore-torch keeps,
  and the 2-D views / projector glue around its ``GaLoreProjector`` (SVD and projections);
* this module: :class:`ConvGaLoreAdamW`, whose ``step`` is galore-torch's ``GaLoreAdamW.step``
  (the Adam arithmetic) run on those views, and :func:`galore_optimizer`, which decides which
  weights are projected;
* :mod:`.summary`: the per-parameter table and the FLOP / state-bytes cost model.

**The reshape.** A conv weight ``W: (C_out, C_in/g, k_h, k_w)`` is optimized as the matrix
``W.view(C_out, C_in/g * k_h * k_w)`` (rows are output filters, no data moves):

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

Update rule (galore-torch's AdamW, the only base optimizer wired up): ``p -= lr * bias_corr *
scale * P^T (m_hat / (sqrt(v_hat) + eps))`` for projected weights (``scale = 1`` for plain ones),
then decoupled weight decay ``p -= lr * wd * p``. galore-torch's default ``eps`` is ``1e-6``
(torch's AdamW: ``1e-8``).
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from convpeft.core.accounting import state_bytes
from convpeft.core.layer_kinds import check_target, layer_kind, select_layers

from . import summary as cost
from .projector import (
    PROJ_TYPES,
    attach_projector,
    detach_projector,
    matrix_shape,
    matrix_view,
    projected_groups,
    will_refresh,
)
from .summary import ROLES, GaLoreSummary
from .upstream import GaLoreAdamW

ParamsArg = nn.Module | Iterable[Any]


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"GaLore {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class GaLoreSettings:
    """Projection settings, checked on construction. Param groups may override each field
    under the same key (galore-torch's group keys)."""

    rank: int = 4
    update_proj_gap: int = 200  # steps between SVD refreshes of the projection
    scale: float = 0.25  # multiplies the projected-back update
    proj_type: str = "std"  # one of PROJ_TYPES

    def __post_init__(self) -> None:
        _positive_int("rank", self.rank)
        _positive_int("update_proj_gap", self.update_proj_gap)
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(
                f"unknown proj_type {self.proj_type!r}; use one of {', '.join(PROJ_TYPES)}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0:
            raise ValueError(f"GaLore scale must be a number > 0, got {s!r}")


_SETTING_KEYS = tuple(f.name for f in fields(GaLoreSettings))


# --------------------------------------------------------------------------------------------
# Which weights are projected


@dataclass
class _Entry:
    name: str
    param: torch.Tensor
    kind: str | None
    candidate: bool  # targeted: projected unless rank >= min(matrix side)


def _entries_from_model(
    model: nn.Module, target: Any, exclude: str | Iterable[str] | None
) -> list[_Entry]:
    # select_layers decides targets by layer kind; a selected layer contributes its weight
    selected = set()
    for _name, module in select_layers(model, target, exclude):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            selected.add(id(w))
    kinds: dict[int, str | None] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            kinds.setdefault(id(p), layer_kind(module))
    return [_Entry(name, p, kinds.get(id(p)), id(p) in selected)
            for name, p in model.named_parameters() if p.requires_grad]


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


def _entries_from_groups(params: Iterable[Any], target: Any) -> list[tuple[dict, list[_Entry]]]:
    """``(group options, entries)`` per param group; a bare iterable of tensors or
    ``(name, tensor)`` pairs is one group."""
    items = list(params)
    if not items:
        raise ValueError("galore_optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict):
            raise TypeError("mix of dicts and parameters; pass param groups or parameters")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        # galore-torch's convention: a group with a "rank" key is projected
        marker = g.get("galore", True if "rank" in g else None)
        rule = _shape_rule(target) if marker is None else None
        entries = []
        for j, item in enumerate(ps):
            name, p = item if isinstance(item, tuple) else (f"group{gi}.param{j}", item)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param group {gi} holds a {type(p).__name__}, not a tensor")
            cand = rule(p) if rule is not None else bool(marker) and p.dim() >= 2
            kind = ("conv" if p.dim() >= 3 else "linear") if p.dim() >= 2 else None
            entries.append(_Entry(name, p, kind, cand))
        out.append(({k: v for k, v in g.items() if k not in ("params", "galore")}, entries))
    return out


def _role_groups(
    user: list[tuple[dict, list[_Entry]]], settings: GaLoreSettings
) -> list[dict[str, Any]]:
    """Torch param groups, each user group split by role (galore / fallback / plain)."""
    groups: list[dict[str, Any]] = []
    for opts, entries in user:
        gal = replace(settings, **{k: opts[k] for k in _SETTING_KEYS if k in opts})
        other = {k: v for k, v in opts.items() if k not in _SETTING_KEYS}
        split: dict[str, list[_Entry]] = {r: [] for r in ROLES}
        for e in entries:
            if not e.candidate:
                split["plain"].append(e)
            elif gal.rank < min(matrix_shape(e.param.shape)):
                split["galore"].append(e)
            else:
                split["fallback"].append(e)
        for role in ROLES:
            if split[role]:
                g = {"params": [(e.name, e.param) for e in split[role]], **other, "role": role}
                if role == "galore":
                    g.update(asdict(gal))  # "rank" in a group is what makes galore-torch project
                groups.append(g)
    return groups


# --------------------------------------------------------------------------------------------
# The optimizer


class ConvGaLoreAdamW(GaLoreAdamW):
    """galore-torch's GaLoreAdamW, made to work on conv weights (see the module docstring).

    Build it with :func:`galore_optimizer`, which picks the projected weights. ``params`` are
    torch param groups; as in galore-torch a group is projected iff it has a ``rank`` key (its
    other :class:`GaLoreSettings` keys default to ``settings``). :func:`galore_optimizer`'s
    groups also carry ``role`` (``"galore"``, ``"fallback"``: targeted but ``rank >= min(m,
    n)``, ``"plain"``) and torch's ``param_names``; ``kinds`` maps those names to layer kinds,
    in the order the parameters were given (the summary's row order).

    State of a projected weight (all tensors, so ``state_dict`` is plain and loads with
    ``torch.load(weights_only=True)``): ``step`` (int), ``exp_avg``/``exp_avg_sq`` of the
    projected shape (``m x r`` or ``r x n``) and ``ortho_matrix`` (the projection, ``r x n`` or
    ``m x r``; a list of both for ``proj_type="full"``).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        settings: GaLoreSettings | None = None,
        target: str = "conv",
        kinds: Mapping[str, str | None] | None = None,
    ) -> None:
        settings = settings or GaLoreSettings()
        groups = []
        for g in params:
            if "rank" in g:
                gal = replace(settings, **{k: g[k] for k in _SETTING_KEYS if k in g})
                g = {**g, **asdict(gal)}
            groups.append(g)
        # keyed by param name (not id) so they survive deepcopy, e.g. the profiler's meta copy
        self._kinds = dict(kinds or {})
        self._settings = settings
        self._target = target
        self.last_step_refreshed = False
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         no_deprecation_warning=True)

    _EXTRA_ATTRS = ("_kinds", "_settings", "_target", "last_step_refreshed")

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles/deep-copies only defaults, state and param_groups; keep the
        # summary metadata too (the profiler deep-copies optimizers onto the meta device)
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._EXTRA_ATTRS}}

    # -- the refresh schedule (read by the profiler) --------------------------------------------

    @property
    def update_proj_gap(self) -> int:
        """Steps between projection refreshes (the smallest over projected groups)."""
        gaps = [g["update_proj_gap"] for g in projected_groups(self.param_groups)]
        return min(gaps) if gaps else self._settings.update_proj_gap

    @update_proj_gap.setter
    def update_proj_gap(self, gap: int) -> None:
        self._settings = replace(self._settings, update_proj_gap=gap)
        for g in projected_groups(self.param_groups):
            g["update_proj_gap"] = int(gap)

    def refreshes_next_step(self) -> bool:
        """Whether the next ``step()`` recomputes (SVD) any projection, assuming every projected
        weight gets a gradient."""
        return any(will_refresh(self.state.get(p, {}), g)
                   for g in projected_groups(self.param_groups) for p in g["params"])

    # -- cost model (convpeft.optim.summary) ----------------------------------------------------

    def projection_refresh_flops(self) -> int:
        """FLOPs of ONE refresh of all projections (thin SVDs; no projection matmuls)."""
        return cost.refresh_flops(self.param_groups)

    def amortized_refresh_flops(self) -> float:
        """Refresh FLOPs per step, averaged over each group's ``update_proj_gap``."""
        return cost.amortized_refresh_flops(self.param_groups)

    def step_flops(self) -> int:
        """FLOPs of one ordinary step's projection matmuls (gradient down + update up)."""
        return cost.step_matmul_flops(self.param_groups)

    def elementwise_flops(self) -> int:
        """Elementwise arithmetic of one step (:func:`.summary.elementwise_flops`)."""
        return cost.elementwise_flops(self.param_groups)

    def summary(self) -> GaLoreSummary:
        """Per-param table: role, rank and the state bytes it will hold after its first step."""
        s = self._settings
        return cost.summarize(self.param_groups, self._kinds, rank=s.rank,
                              update_proj_gap=self.update_proj_gap, proj_type=s.proj_type,
                              scale=float(s.scale), target=self._target)

    def state_bytes(self) -> int:
        """Bytes of all optimizer state tensors now, measured (each storage counted once, whole).
        Equals ``summary().state_bytes`` after every parameter has stepped."""
        return state_bytes(self)

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
                st = real_state[p]
                projected.append((st, will_refresh(st, g)))
                attach_projector(st, g)
                v, copied = matrix_view(p)
                if copied:
                    copy_back.append((p, v))
                views.append(v)
                view_state[v] = st  # the same dict: upstream's updates land in our state
            view_groups.append({**g, "params": views})

        self.param_groups, self.state = view_groups, view_state
        try:
            # galore-torch's AdamW.step, unwrapped from torch's per-class step hooks (so hooks on
            # this optimizer fire once, around this method) and from no_grad (we are inside it)
            inspect.unwrap(GaLoreAdamW.step)(self)
        finally:
            self.param_groups, self.state = real_groups, real_state
            for st, refresh in projected:
                detach_projector(st, refresh)
        for p, v in copy_back:
            p.copy_(v.view_as(p))
        self.last_step_refreshed = any(r for _, r in projected)
        return loss


def galore_optimizer(
    params: ParamsArg,
    *,
    rank: int = 4,
    lr: float = 1e-3,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target: Any = "conv",
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    exclude: str | Iterable[str] | None = None,
) -> ConvGaLoreAdamW:
    """GaLore-AdamW over a model or param groups, with conv weights projected as matrices.

    ``params``:

    * an ``nn.Module``: its trainable params, named by qualified name; the weights of the layers
      ``convpeft.core.layer_kinds.select_layers(model, target, exclude)`` selects are projected,
      everything else (BN, biases, non-target layers) gets plain AdamW. ``exclude`` is a regex
      or a list of them over qualified layer names (a string is ONE pattern).
    * an iterable of tensors or ``(name, tensor)`` pairs: targets by shape -- ``target="conv"``
      projects >= 3-D tensors, ``"linear"`` 2-D ones, ``"all"`` both (kind targets such as
      ``"depthwise"`` need a model and raise).
    * a list of param-group dicts: ``"galore": True`` (or a ``"rank"`` key, galore-torch's
      convention) projects the group's >= 2-D params, ``"galore": False`` keeps it plain,
      neither applies the shape rule above. Groups may override ``rank``, ``update_proj_gap``,
      ``scale``, ``proj_type``, ``lr``, ``weight_decay``, ``betas``, ``eps``.

    Weights with ``rank >= min(matrix side)`` go to a plain "fallback" group (see
    ``summary()``); if that leaves nothing projected this warns (it is plain AdamW).

    Raises ``ValueError`` for rank < 1, update_proj_gap < 1, unknown proj_type/target, and when
    no trainable parameter matches ``target``.
    """
    settings = GaLoreSettings(rank, update_proj_gap, scale, proj_type)
    if isinstance(params, nn.Module):
        check_target(target)
        user = [({}, _entries_from_model(params, target, exclude))]
    else:
        if exclude is not None:
            raise ValueError("exclude needs a model (it matches qualified layer names)")
        user = _entries_from_groups(params, target)
    if not any(e.candidate for _, es in user for e in es):
        raise ValueError(
            f"no trainable parameter matches GaLore target {target!r} (targets are the "
            "weights of the selected layers, >= 2-D); check target/exclude or requires_grad"
        )
    kinds = {e.name: e.kind for _, es in user for e in es}
    opt = ConvGaLoreAdamW(
        _role_groups(user, settings), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
        settings=settings, target=target if isinstance(target, str) else repr(target),
        kinds=kinds)
    if not projected_groups(opt.param_groups):
        warnings.warn(f"GaLore rank {rank} >= the smaller matrix side of every targeted weight: "
                      "nothing is projected, this is plain AdamW", stacklevel=2)
    return opt
