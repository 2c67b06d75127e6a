"""Configuration of an adapter run: one dataclass, validated, JSON round-trippable.

One :class:`AdapterConfig` travels the whole way: :func:`~convpeft.apply_adapters` builds it from
its arguments (construction validates, the only place that does), each wrapped layer keeps the
per-layer copy :meth:`AdapterConfig.for_layer` gives it (``rank_pattern`` resolved into
``rank``) as ``layer.config``, :func:`~convpeft.save_adapters` writes every layer's
:meth:`AdapterConfig.layer_dict` to ``adapter_config.json``, and :func:`~convpeft.load_adapters`
turns each entry back into a config with :meth:`AdapterConfig.from_layer_dict`.

Every field carries its help text in ``metadata["help"]`` so CLIs can build options from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

METHODS = ("lora", "dora")
MODES = ("auto", "activation", "weight")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class AdapterConfig:
    """What :func:`convpeft.apply_adapters` does to a model.

    ``alpha=None`` means ``alpha = rank`` for each layer, i.e. a scaling of 1 (plain) or
    ``sqrt(rank)`` (rsLoRA). With a fixed ``alpha`` the scaling is ``alpha / rank`` (plain) or
    ``alpha / sqrt(rank)`` (rsLoRA), per layer, so ``rank_pattern`` changes it too.
    """

    method: str = field(default="lora", metadata=_help("adapter method: 'lora' or 'dora'"))
    rank: int = field(default=8, metadata=_help("adapter rank r (>= 1, any value on any kind)"))
    alpha: float | None = field(
        default=None,
        metadata=_help("LoRA alpha; scaling = alpha/r (alpha/sqrt(r) with rslora); None: alpha=r"),
    )
    target: Any = field(
        default="conv",
        metadata=_help(
            "layers to adapt: conv, standard, pointwise, depthwise, grouped, linear, all, a list "
            "of these, or a callable (name, module) -> bool"
        ),
    )
    exclude: list[str] | None = field(
        default=None, metadata=_help("regexes of layer names to leave alone (re.search)")
    )
    rank_pattern: dict[str, int] | None = field(
        default=None,
        metadata=_help("regex -> rank overrides; the first pattern (dict order) that matches wins"),
    )
    mode: str = field(
        default="auto",
        metadata=_help(
            "'activation' (x -> A -> B next to the frozen layer), 'weight' (one conv with "
            "W0 + s*dW) or 'auto' (per layer, whichever costs fewer FLOPs for the input seen)"
        ),
    )
    trainable: list[str] | None = field(
        default=None,
        metadata=_help("regexes of parameter names kept trainable besides the adapters (e.g. fc)"),
    )
    rslora: bool = field(default=False, metadata=_help("scale by alpha/sqrt(r) instead of alpha/r"))
    dropout: float = field(
        default=0.0, metadata=_help("dropout on the adapter branch input (forces activation mode)")
    )
    freeze_a: bool = field(
        default=False,
        metadata=_help("LoRA-FA: keep A at its random init and train only B; a LoRA conv then "
                       "saves A x instead of x for backward where that is smaller"),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for any bad field (run on construction)."""
        check_method(self.method)
        check_rank(self.rank)
        check_alpha(self.alpha)
        check_mode(self.mode)
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use e.g. "
                             "dropout=0.05")
        if self.mode == "weight" and self.dropout > 0:
            raise ValueError(
                "dropout on the adapter input cannot be expressed in weight space; use "
                "mode='activation' or mode='auto' (which uses activation space while training)"
            )
        for pattern, r in (self.rank_pattern or {}).items():
            check_rank(r, where=f"rank_pattern[{pattern!r}]")

    # -- per layer ------------------------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """The rank of layer ``name``: the first ``rank_pattern`` regex that matches, else
        ``rank``."""
        for pattern, r in (self.rank_pattern or {}).items():
            if re.search(pattern, name):
                return int(r)
        return self.rank

    def for_layer(self, name: str) -> AdapterConfig:
        """The config one layer keeps: this one with its rank resolved."""
        rank = self.rank_for(name)
        return self if rank == self.rank and not self.rank_pattern else replace(
            self, rank=rank, rank_pattern=None)

    @property
    def scaling(self) -> float:
        """``s`` of ``W0 + s * B @ A`` at this config's rank."""
        return scaling(self.rank, self.alpha, self.rslora)

    LAYER_KEYS = ("method", "rank", "alpha", "rslora", "mode", "dropout", "freeze_a")

    def layer_dict(self) -> dict[str, Any]:
        """What ``adapter_config.json`` stores for one layer (keys :attr:`LAYER_KEYS`; ``alpha``
        resolved to a number)."""
        d = {k: getattr(self, k) for k in self.LAYER_KEYS}
        d["alpha"] = float(self.rank if self.alpha is None else self.alpha)
        d["dropout"] = float(self.dropout)
        return d

    @classmethod
    def from_layer_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`layer_dict` (missing optional keys take their defaults)."""
        return cls(**{k: d[k] for k in cls.LAYER_KEYS if k in d})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; a callable target is stored as its repr (not reloadable)."""
        d = asdict(self)
        if callable(self.target):
            d["target"] = repr(self.target)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict` (unknown keys ignored; validated)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; use one of {', '.join(METHODS)}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


def check_rank(rank: Any, where: str = "rank") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}={rank!r} is invalid; the rank must be an integer >= 1, e.g. 8")


def check_alpha(alpha: Any) -> None:
    if alpha is None:
        return
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
            or not math.isfinite(alpha)):
        raise ValueError(
            f"alpha={alpha!r} is invalid; alpha must be a number > 0 and finite (or None for "
            "alpha = rank)"
        )


def scaling(rank: int, alpha: float | None, rslora: bool) -> float:
    """The factor ``s`` of ``W0 + s * B @ A``: ``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA."""
    a = float(rank if alpha is None else alpha)
    return a / math.sqrt(rank) if rslora else a / rank
