"""GaLore's projector on conv weights: the 2-D matrix a weight is projected as, the shapes
galore-torch keeps for it, and the glue that hands galore-torch a 2-D view of a 4-D weight.

galore-torch's :class:`~galore_torch.galore_projector.GaLoreProjector` does the SVD and both
projections; it only understands matrices (a 4-D conv weight makes it call ``torch.diag`` on a
3-D tensor and raise). A conv weight ``(C_out, C_in/g, k_h, k_w)`` is therefore handed over as
``W.view(C_out, C_in/g * k_h * k_w)``: rows are output filters, the layout ``nn.Conv2d`` uses for
its im2col matmul, so no data moves (the view shares the weight's storage).

Upstream keeps the projector *object* in the optimizer state, which makes ``state_dict`` hold a
pickled class (``torch.load(weights_only=True)`` refuses it). We keep only its tensor,
``ortho_matrix``, and rebuild the otherwise stateless projector around each step
(:func:`attach_projector` / :func:`detach_projector`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .upstream import GaLoreProjector

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
"""Projection types of galore-torch's ``GaLoreProjector``."""


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D matrix a weight of ``shape`` is projected as: ``(shape[0], prod(shape[1:]))``.

    ``(C_out, C_in/g, k_h, k_w) -> (C_out, C_in/g*k_h*k_w)``; depthwise ``(C, 1, k, k) ->
    (C, k*k)``; 2-D shapes are unchanged.
    """
    if len(shape) < 2:
        raise ValueError(f"GaLore needs a weight with >= 2 dims, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


def projection_side(m: int, n: int, proj_type: str) -> str:
    """Which side galore-torch projects an ``m x n`` matrix on: ``"right"`` (moments ``m x r``),
    ``"left"`` (``r x n``) or ``"full"`` (``r x r``). ``std`` projects the smaller side."""
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
    side = projection_side(m, n, proj_type)
    if side == "right":
        return (m, rank), [(rank, n)]
    if side == "left":
        return (rank, n), [(m, rank)]
    return (rank, rank), [(m, rank), (rank, n)]


def matrix_view(p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(2-D version of p with p's gradient, whether it is a copy to write back)``.

    A contiguous weight gives a view sharing its storage, so galore-torch's in-place
    ``p.add_`` updates the weight itself; a non-contiguous one (e.g. ``channels_last``) gives a
    contiguous copy the caller must copy back after the step.
    """
    m, n = matrix_shape(p.shape)
    if p.is_contiguous():
        v, copied = p.detach().view(m, n), False
    else:
        v, copied = p.detach().reshape(m, n).clone(), True
    v.grad = p.grad.reshape(m, n)
    return v, copied


def attach_projector(state: dict[str, Any], group: dict[str, Any]) -> None:
    """Put a ``GaLoreProjector`` holding ``state["ortho_matrix"]`` (if any) in ``state``, where
    galore-torch's step looks for it."""
    proj = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                           scale=group["scale"], proj_type=group["proj_type"])
    proj.ortho_matrix = state.pop("ortho_matrix", None)
    state["projector"] = proj


def detach_projector(state: dict[str, Any], refreshed: bool) -> None:
    """Replace the projector in ``state`` by its ``ortho_matrix`` tensor(s), compacted after a
    refresh: galore-torch returns slices of the SVD's ``U``/``Vh``, which would keep the whole
    ``m x min(m, n)`` factor alive (not low-rank memory)."""
    proj = state.pop("projector", None)
    if proj is not None:
        ortho = proj.ortho_matrix
        state["ortho_matrix"] = _compact(ortho) if refreshed else ortho


def projected_groups(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The param groups galore-torch projects: by its convention, those with a ``rank`` key."""
    return [g for g in groups if "rank" in g]


def will_refresh(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """galore-torch's rule: the next step recomputes the projection if there is none yet or
    ``step % update_proj_gap == 0``."""
    return (state.get("ortho_matrix") is None
            or state.get("step", 0) % group["update_proj_gap"] == 0)


def _compact(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    return value
