"""``MethodConfig``: everything that says how a method fine-tunes, validated once when it is
built (a wrong value fails there, naming the fix, before any model is touched)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from torch import nn

from convpeft.adapters import AdapterConfig
from convpeft.memory.sparse import PREFIX_BN, SparseSplit, sparse_split
from convpeft.optim import GaLoreSettings

from .registry import get_method

BN_POLICIES = ("train", "freeze", "stats")
FA_INITS = ("data", "random")
PREFIX_STATS = ("source", "target")
DEFAULT_BN = "train"


@dataclass
class MethodConfig:
    """One method's settings. ``lr=None`` uses the method's default learning rate.

    The shared part: ``rank`` (adapter or GaLore rank), ``target``/``exclude`` (the layers
    adapted or projected, see :mod:`convpeft.core.layer_kinds`), the BN policy ``bn``, ``lr`` and
    ``weight_decay``. ``train_head`` keeps the classifier trainable for lora/dora (needed for new
    classes; on by default). ``lean=True`` runs :func:`convpeft.lean_activations` on the prepared
    model (exact; the report is in ``PreparedMethod.extra["lean"]``); BN goes lean only while in
    eval mode (``bn="freeze"``).

    Method-specific settings live in their own config, each validated where it is defined:
    ``adapter`` (an :class:`~convpeft.adapters.AdapterConfig`: ``alpha``, ``rank_pattern``,
    ``mode``, ``dropout``, ``rslora``) for lora/lora-fa/dora, ``galore`` (a
    :class:`~convpeft.optim.GaLoreSettings`: ``update_proj_gap``, ``scale``, ``proj_type``) for
    galore. Their ``method``/``rank``/``target``/``exclude``/``freeze_a`` come from this config
    (:meth:`adapter_config`, :meth:`galore_settings`); setting them there too is refused.
    ``checkpoint=True`` runs :func:`convpeft.checkpoint_blocks` on the prepared model (blocks
    auto-detected; a list of module names picks them; exact, one extra forward of those
    blocks per update; the report is in ``PreparedMethod.extra["checkpoint"]``).
    ``update_blocks=K`` trains only the last K blocks (:mod:`convpeft.memory.sparse`;
    ``sparse_blocks``
    names the candidate blocks, None: detected; 0: every block frozen, the only K method
    ``head`` takes, and refused for adapter methods, which then have no layer to adapt), with
    the frozen prefix run without a graph in
    ``prefix_chunks`` micro-batches and its BN per ``prefix_bn``; the report is in
    ``PreparedMethod.extra["sparse"]``. ``checkpoint=True`` then checkpoints the trainable
    blocks only. ``fa_init`` (lora-fa): ``"data"`` (default) has the training loop set the
    frozen ``A`` to the top-r principal directions of each layer's inputs before the first
    step (:func:`convpeft.adapters.calibrate_frozen_a`, which :func:`convpeft.train.finetune`
    calls; :func:`prepare` itself sees no data), ``"random"`` keeps the random draw.
    ``prefix_stats`` (sparse updates with ``prefix_bn="eval"``): ``"source"`` (default) keeps
    the source model's BN statistics in the frozen prefix, ``"target"`` has the training loop
    re-estimate them on the training data before the first step and freeze them again
    (:func:`convpeft.train.adapt_prefix_bn`, AdaBN for the prefix; exact chunking kept).
    """

    name: str
    rank: int = 8
    lr: float | None = None
    weight_decay: float = 0.0
    bn: str = DEFAULT_BN
    target: Any = "conv"
    exclude: list[str] | None = None
    train_head: bool = True
    lean: bool = False
    checkpoint: bool | list[str] = False
    adapter: AdapterConfig | None = None
    galore: GaLoreSettings | None = None
    update_blocks: int | None = None
    sparse_blocks: list[str] | None = None
    prefix_chunks: int = 1
    prefix_bn: str = "eval"
    prefix_stats: str = "source"
    fa_init: str = "data"

    def __post_init__(self) -> None:
        spec = get_method(self.name)
        self._check_sparse()
        ck = self.checkpoint
        if not (isinstance(ck, bool) or (isinstance(ck, (list, tuple)) and ck
                                         and all(isinstance(n, str) for n in ck))):
            raise ValueError("checkpoint must be True/False or a non-empty list of module names "
                             f"(got {ck!r})")
        if self.bn not in BN_POLICIES:
            raise ValueError(f"bn must be one of {', '.join(BN_POLICIES)} (got {self.bn!r})")
        if self.fa_init not in FA_INITS:
            raise ValueError(f"fa_init must be one of {', '.join(FA_INITS)} (got "
                             f"{self.fa_init!r})")
        for key, value, kind in (("adapter", self.adapter, AdapterConfig),
                                 ("galore", self.galore, GaLoreSettings)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{key}= must be a {kind.__name__}, got {type(value).__name__}")
        # the rank (and every method setting) is checked once, by the method's own config
        if self.name == "galore":
            self.galore_settings()
        elif spec.ranked:
            self.adapter_config()

    def _check_sparse(self) -> None:
        k = self.update_blocks
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"update_blocks must be None or an int >= 0 (got {k!r})")
        if self.name == "head" and k:
            raise ValueError(f"method 'head' trains no block (update_blocks={k}): use "
                             "update_blocks=0 (the whole backbone as a graph-free prefix) or a "
                             "method that trains the backbone (full, bitfit, lora, ...)")
        c = self.prefix_chunks
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"prefix_chunks must be an int >= 1 (got {c!r})")
        if k is None and (c != 1 or self.sparse_blocks is not None or self.prefix_bn != "eval"
                          or self.prefix_stats != "source"):
            raise ValueError("prefix_chunks / sparse_blocks / prefix_bn / prefix_stats need "
                             "update_blocks=K "
                             "(the number of last blocks that train; 0: head only)")
        if self.prefix_stats not in PREFIX_STATS:
            raise ValueError(f"prefix_stats must be one of {', '.join(PREFIX_STATS)} "
                             f"(got {self.prefix_stats!r})")
        if self.prefix_stats == "target" and self.prefix_bn != "eval":
            raise ValueError("prefix_stats='target' re-estimates a frozen prefix's BN statistics "
                             "(prefix_bn='eval'); with prefix_bn='model' the prefix's BNs "
                             "already follow their mode: drop one of the two")
        if self.prefix_bn not in PREFIX_BN:
            raise ValueError(f"prefix_bn must be one of {', '.join(PREFIX_BN)} "
                             f"(got {self.prefix_bn!r})")
        if isinstance(self.sparse_blocks, str):
            raise ValueError("sparse_blocks must be a list of module names, not the string "
                             f"{self.sparse_blocks!r}")

    def split(self, model: nn.Module) -> SparseSplit | None:
        """Where ``update_blocks`` cuts ``model`` (None without it); the model is untouched."""
        if self.update_blocks is None:
            return None
        return sparse_split(model, self.update_blocks, blocks=self.sparse_blocks)

    def adapter_config(self) -> AdapterConfig:
        """The :class:`AdapterConfig` ``prepare`` applies (lora, lora-fa, dora)."""
        own = {"method": self.name.removesuffix("-fa"), "rank": self.rank,
               "target": self.target, "exclude": self.exclude,
               "freeze_a": self.name.endswith("-fa")}
        base = self.adapter or AdapterConfig(method=own["method"], rank=self.rank)
        _refuse_shadowed("adapter", base, AdapterConfig, own)
        return replace(base, **own)

    def galore_settings(self) -> GaLoreSettings:
        """The :class:`GaLoreSettings` ``prepare`` uses (galore)."""
        base = self.galore or GaLoreSettings(rank=self.rank)
        _refuse_shadowed("galore", base, GaLoreSettings, {"rank": self.rank})
        return replace(base, rank=self.rank)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else get_method(self.name).default_lr

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr"] = self.resolved_lr
        if callable(d["target"]):
            d["target"] = getattr(d["target"], "__name__", "callable")
        if self.adapter is not None:
            d["adapter"] = self.adapter.to_dict()
        return d


def _refuse_shadowed(key: str, given: Any, cls: type, own: dict[str, Any]) -> None:
    """A sub-config's field that this MethodConfig sets must be left at its default (or agree)."""
    defaults = {f.name: f.default for f in fields(cls)}
    for name, value in own.items():
        have = getattr(given, name)
        if have != value and have != defaults.get(name):
            raise ValueError(f"{key}.{name}={have!r} conflicts with MethodConfig's {value!r}: "
                             f"set {name} on MethodConfig, not in {key}=")
