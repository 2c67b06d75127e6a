"""Which layers of a model are adapted, and the report of them: :class:`AdapterReport` (one
:class:`AdapterRow` per adapter; ``str(report)`` is a table) is what :func:`apply_adapters`
returns and what :func:`adapter_report` takes of any adapted model at any time."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .layer import AdapterLayer

__all__ = ["AdapterReport", "AdapterRow", "adapter_layers", "adapter_report", "is_adapter",
           "module_names"]


def is_adapter(module: nn.Module) -> bool:
    """Whether ``module`` is a convpeft adapter wrapper (it then has ``.base_layer``)."""
    return isinstance(module, AdapterLayer)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(name, wrapper)`` of every adapter in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every qualified name it appears under}``, first the one
    ``named_modules()`` gives it (a module used at several places has several)."""
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(n)
    return out



@dataclass
class AdapterRow:
    """One adapted layer: ``shape`` is the base weight's, ``layer_params`` its element count;
    ``shared_with``: the other names of a module used at several places (one adapter serves
    them all).
    ``last_mode``/``mode_reason``: what the layer's last forward computed in and why (see
    :meth:`convpeft.adapters.layer.AdapterLayer.resolve_mode`); a report taken after a forward
    (``adapter_report(model)``) shows what ``mode="auto"`` chose per layer."""

    name: str
    kind: str
    method: str
    shape: tuple[int, ...]
    rank: int
    scaling: float
    mode: str
    adapter_params: int
    layer_params: int
    last_mode: str | None = None  # the computation the last forward used (None: none yet)
    mode_reason: str | None = None  # fixed | flops | memory | cuda | dropout | lora-fa
    shared_with: list[str] = field(default_factory=list)  # the module's other places, if shared

    @property
    def outgrows_layer(self) -> bool:
        """The adapter has more parameters than the weight it adapts (rank too large)."""
        return self.adapter_params > self.layer_params


@dataclass
class AdapterReport:
    """What :func:`apply_adapters` did; ``str(report)`` is a table."""

    layers: list[AdapterRow] = field(default_factory=list)
    adapter_params: int = 0
    trainable_params: int = 0
    total_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.layers:
            d = asdict(r)
            d["shape"] = list(r.shape)
            d["outgrows_layer"] = r.outgrows_layer
            rows.append(d)
        return {
            "layers": rows,
            "adapter_params": self.adapter_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }

    def __str__(self) -> str:
        head = ("layer", "kind", "method", "weight shape", "rank", "mode", "adapter", "layer")
        body = [
            (r.name + (f" (also at {', '.join(r.shared_with)})" if r.shared_with else ""),
             r.kind, r.method, "x".join(map(str, r.shape)), str(r.rank),
             r.mode if r.last_mode is None or r.mode != "auto"
             else f"auto: {r.last_mode} ({r.mode_reason})",
             f"{r.adapter_params:,}" + (" *" if r.outgrows_layer else ""), f"{r.layer_params:,}")
            for r in self.layers
        ]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
                  for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:{'<' if i < 6 else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines.append(
            f"{len(self.layers)} adapted layers, {self.adapter_params:,} adapter params; "
            f"trainable {self.trainable_params:,} of {self.total_params:,} ({pct:.2f}%)"
        )
        if any(r.outgrows_layer for r in self.layers):
            lines.append("* adapter larger than the layer it adapts: lower the rank there")
        if any(r.shared_with for r in self.layers):
            lines.append("also at: a module used at several places has one adapter at all of "
                         "them (trained and merged for every use)")
        return "\n".join(lines)


def _row(name: str, m: AdapterLayer, names: list[str]) -> AdapterRow:
    w = m.base_layer.weight
    return AdapterRow(name=name, kind=m.kind, method=m.method, shape=tuple(w.shape), rank=m.rank,
                      scaling=m.scaling, mode=m.mode, adapter_params=m.num_adapter_params(),
                      layer_params=w.numel(), last_mode=m.last_mode, mode_reason=m.last_reason,
                      shared_with=[n for n in names if n != name])


def adapter_report(model: nn.Module, names: Iterable[str] | None = None) -> AdapterReport:
    """Report on the adapters of ``model`` (only those in ``names`` if given) and its totals."""
    wanted = None if names is None else set(names)
    places = module_names(model)
    rows = [_row(n, m, places[id(m)]) for n, m in adapter_layers(model)
            if wanted is None or n in wanted]
    params = list(model.parameters())
    return AdapterReport(
        layers=rows,
        adapter_params=sum(m.num_adapter_params() for _, m in adapter_layers(model)),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )
