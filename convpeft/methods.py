"""Fine-tuning methods: which parameters train, how, and what batch norm does meanwhile.

=========  ==================================================================================
method     trains
=========  ==================================================================================
full       every parameter (AdamW)
head       the classifier only (linear probe; AdamW)
bitfit     every bias + the classifier (AdamW). torchvision's convs that a BN follows have
           ``bias=False``, so the backbone's biases are mostly the BN biases (shifts); BN
           scales stay frozen. Other biases train too (MobileNetV3's squeeze-excitation
           1x1 convs and hidden classifier Linear).
lora       low-rank adapters on the ``target`` convs (:func:`convpeft.apply_adapters`) + the
           classifier (+ BN affine under ``bn="train"``); AdamW over those
lora-fa    as lora with ``A`` frozen (LoRA-FA): half the adapter trains, and a conv saves
           ``A x`` instead of ``x`` for backward where that is smaller; ``A`` is set along each
           layer's principal input directions on the training data before the first step
           (``fa_init="data"``, :mod:`convpeft.adapters.lora_fa`) or kept at its random draw
dora       as lora, with weight-decomposed (magnitude/direction) adapters
galore     every parameter; :func:`convpeft.optim.galore_optimizer` projects the ``target``
           convs' gradients to rank ``rank`` (AdamW state in the projected space), plain AdamW
           for the rest
=========  ==================================================================================

Batch-norm policy (``MethodConfig.bn``), applied on top of the method:

* ``"train"`` (default): BN in train mode (batch statistics; running stats updated) and BN
  affine parameters trainable where the method trains backbone weights (full, galore, lora,
  dora; bitfit trains the BN biases, head none). The usual fine-tuning setting.
* ``"freeze"``: BN in eval mode (running statistics, not updated) and BN affine frozen, for
  every method (bitfit then trains only non-BN biases + head). BN becomes a fixed per-channel
  affine map, so backward saves no activations for batch statistics: the cheapest option.
* ``"stats"``: AdaBN. BN affine frozen; running statistics are reset by :func:`prepare` and
  re-estimated on the target data as a cumulative average (``momentum=None``) while training.

Sparse updates (``MethodConfig.update_blocks=K``, :mod:`convpeft.sparse`): any method trains
only what runs from the last K blocks of the backbone on (adapters, BN affine, biases or every
weight there, and the head); the prefix before them is frozen, runs without a graph and, with
``prefix_chunks=N``, in N micro-batches. Its BNs stay in eval mode with the source model's
running statistics (``prefix_bn="eval"``, even under ``bn="stats"``; with
``prefix_stats="target"`` those statistics are first re-estimated on the training data and
frozen again), or follow ``bn`` (``prefix_bn="model"``, unchunked only).

``model.train()`` puts every BN back in train mode, so the loop must call :func:`set_bn_mode`
(or :meth:`PreparedMethod.train_mode`) after it; :func:`convpeft.train.finetune` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from .adapters import AdapterConfig, apply_adapters
from .atomic import model_transaction
from .checkpoint import checkpoint_blocks, resolve_blocks
from .layer_kinds import select_layers
from .lean import lean_activations
from .models import get_head
from .optim import GaLoreSettings, galore_optimizer
from .registry import Registry
from .sparse import PREFIX_BN, SparseSplit, check_sparse, sparse_split, sparse_update

__all__ = [
    "BN_POLICIES",
    "MethodConfig",
    "MethodSpec",
    "PreparedMethod",
    "bn_modules",
    "count_trainable",
    "get_method",
    "list_methods",
    "prepare",
    "register_method",
    "set_bn_mode",
]

BN_POLICIES = ("train", "freeze", "stats")
FA_INITS = ("data", "random")
PREFIX_STATS = ("source", "target")
DEFAULT_BN = "train"


@dataclass
class MethodConfig:
    """One method's settings. ``lr=None`` uses the method's default learning rate.

    The shared part: ``rank`` (adapter or GaLore rank), ``target``/``exclude`` (the layers
    adapted or projected, see :mod:`convpeft.layer_kinds`), the BN policy ``bn``, ``lr`` and
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
    ``update_blocks=K`` trains only the last K blocks (:mod:`convpeft.sparse`; ``sparse_blocks``
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


@dataclass
class PreparedMethod:
    """A model ready to fine-tune: its optimizer, config, a report, and the trainable count.

    ``report``: the ``AdapterReport`` (lora/dora), the ``GaLoreSummary`` (galore), or a dict
    ``{"trainable": [names], "trainable_params", "total_params"}`` (full/head/bitfit).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: MethodConfig
    report: Any
    trainable_params: int
    total_params: int = 0
    extra: dict = field(default_factory=dict)

    def train_mode(self) -> nn.Module:
        """``model.train()`` then the BN policy; call at the start of every epoch."""
        self.model.train()
        set_bn_mode(self.model, self.config.bn)
        return self.model


@dataclass(frozen=True)
class MethodSpec:
    """A registered fine-tuning method; ``setup(model, cfg) -> (optimizer, report or None)``."""

    name: str  # what configs, the CLI and result rows use, e.g. "lora-fa"
    label: str  # display name in plots and reports, e.g. "LoRA-FA"
    description: str
    default_lr: float
    ranked: bool  # takes a rank (adapter rank, GaLore projection rank); sweeps expand over ranks
    setup: Callable[[nn.Module, MethodConfig], tuple[torch.optim.Optimizer, Any]]


_METHODS: Registry[MethodSpec] = Registry("method")


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry; ``ValueError`` if its name is already registered."""
    return _METHODS.register(spec.name, spec)


def list_methods(ranked: bool | None = None) -> list[str]:
    """Method names in registration order; ``ranked=True``/``False``: only those that do / do
    not take a rank."""
    return [n for n in _METHODS.names() if ranked is None or _METHODS.get(n).ranked == ranked]


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name``; ``ValueError`` naming the choices."""
    return _METHODS.get(name)


# ----------------------------------------------------------------------------- helpers
def bn_modules(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_bn_mode(model: nn.Module, policy: str) -> None:
    """Put BN layers in the mode ``policy`` needs; call after ``model.train()``/``eval()``.

    Only acts when the model is in training mode: evaluation keeps every BN in eval mode.
    """
    if policy not in BN_POLICIES:
        raise ValueError(f"bn must be one of {', '.join(BN_POLICIES)} (got {policy!r})")
    if not model.training:
        return
    for _, m in bn_modules(model):
        m.train(policy != "freeze")


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _adamw(model: nn.Module, cfg: MethodConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {cfg.name!r} with bn={cfg.bn!r} leaves nothing to train")
    return torch.optim.AdamW(params, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)


def _bn_param_names(model: nn.Module) -> set[str]:
    out = set()
    for name, m in bn_modules(model):
        for pn, _ in m.named_parameters(recurse=False):
            out.add(f"{name}.{pn}" if name else pn)
    return out


def _head_param_names(model: nn.Module) -> set[str]:
    head, layer = get_head(model)
    return {f"{head}.{pn}" for pn, _ in layer.named_parameters(recurse=False)}


def _prefix_params(model: nn.Module, cfg: MethodConfig) -> set[str]:
    """Parameters of the frozen prefix under ``cfg.update_blocks`` (empty without it)."""
    split = cfg.split(model)
    return split.prefix_params if split is not None else set()


def _set_trainable(model: nn.Module, names: set[str], cfg: MethodConfig | None = None) -> None:
    if cfg is not None:
        names = names - _prefix_params(model, cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


# ----------------------------------------------------------------------------- methods
def _setup_full(model: nn.Module, cfg: MethodConfig):
    _set_trainable(model, {n for n, _ in model.named_parameters()}, cfg)
    return _adamw(model, cfg), None


def _setup_head(model: nn.Module, cfg: MethodConfig):
    _set_trainable(model, _head_param_names(model), cfg)
    return _adamw(model, cfg), None


def _setup_bitfit(model: nn.Module, cfg: MethodConfig):
    biases = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    _set_trainable(model, biases | _head_param_names(model), cfg)
    return _adamw(model, cfg), None


def _setup_adapters(model: nn.Module, cfg: MethodConfig):
    head, _ = get_head(model)
    prefix = _prefix_params(model, cfg)
    trainable = []
    if cfg.train_head:
        trainable.append(rf"^{re.escape(head)}\.")
    if cfg.bn == "train":
        trainable += [rf"^{re.escape(n)}$" for n in sorted(_bn_param_names(model) - prefix)]
    adapter = replace(cfg.adapter_config(), trainable=trainable or None)
    split = cfg.split(model)
    if split is not None and split.prefix:  # no adapter in the frozen prefix
        adapter = replace(adapter, exclude=[*(adapter.exclude or []), *(
            rf"^{re.escape(p)}(\.|$)" for p in split.prefix)])
        if not select_layers(model, adapter.target, adapter.exclude):
            raise ValueError(f"update_blocks={cfg.update_blocks} leaves no {adapter.target!r} "
                             f"layer outside the frozen prefix for {cfg.name}'s adapters: train "
                             "more blocks, or use method 'head' with update_blocks=0")
    report = apply_adapters(model, adapter)
    return _adamw(model, cfg), report


def _setup_galore(model: nn.Module, cfg: MethodConfig):
    _set_trainable(model, {n for n, _ in model.named_parameters()}, cfg)
    _apply_bn_freezing(model, cfg)  # before building the optimizer, so frozen BN is left out
    g = cfg.galore_settings()
    opt = galore_optimizer(
        model, rank=g.rank, lr=cfg.resolved_lr, update_proj_gap=g.update_proj_gap,
        scale=g.scale, proj_type=g.proj_type, target=cfg.target, weight_decay=cfg.weight_decay,
        exclude=cfg.exclude,
    )
    return opt, opt.summary()


# registration order is list_methods() order (CLI choices, sweep grids, plot legends)
for _name, _label, _ranked, _lr, _setup, _description in (
    ("full", "full FT", False, 1e-3, _setup_full, "all parameters, AdamW"),
    ("head", "head only", False, 1e-2, _setup_head, "linear probe: classifier only"),
    ("bitfit", "BitFit", False, 1e-2, _setup_bitfit, "biases (BN shifts) + classifier"),
    ("lora", "LoRA", True, 3e-3, _setup_adapters, "LoRA adapters on convs + classifier"),
    ("dora", "DoRA", True, 3e-3, _setup_adapters, "DoRA adapters on convs + classifier"),
    ("galore", "GaLore", True, 1e-3, _setup_galore, "GaLore-projected AdamW, all params"),
    ("lora-fa", "LoRA-FA", True, 3e-3, _setup_adapters,
     "LoRA-FA (A frozen, B trains) on convs + classifier"),
):
    register_method(MethodSpec(_name, label=_label, description=_description, default_lr=_lr,
                               ranked=_ranked, setup=_setup))


def _apply_bn_freezing(model: nn.Module, cfg: MethodConfig) -> None:
    if cfg.bn in ("freeze", "stats"):
        for _, m in bn_modules(model):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def prepare(model: nn.Module, config: MethodConfig | str) -> PreparedMethod:
    """Set ``model`` up for ``config`` (in place): trainable flags, adapters, optimizer, BN.

    ``config`` may be a method name (defaults for everything else). All or nothing: what can
    be checked on the plain model is checked first, and a step that fails later (a method
    that leaves nothing to train, an interrupt) puts the model back exactly as it was
    (:func:`convpeft.atomic.model_transaction`).
    """
    cfg = MethodConfig(config) if isinstance(config, str) else config
    if not isinstance(cfg, MethodConfig):
        raise TypeError(f"config must be a MethodConfig or a method name, got "
                        f"{type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare: model must be a torch.nn.Module, got {type(model).__name__}")
    split = cfg.split(model)  # checked first: a bad K or block name leaves the model untouched
    if split is not None:  # chunking / prefix BN refused now, not after the setup
        check_sparse(model, split, prefix_chunks=cfg.prefix_chunks, prefix_bn=cfg.prefix_bn,
                     frozen=False)
    blocks = None
    if cfg.checkpoint:
        blocks = None if cfg.checkpoint is True else list(cfg.checkpoint)
        if split is not None and blocks is None:  # the prefix runs without graph: nothing to do
            blocks = list(split.trainable_blocks)
        if blocks is None or blocks:
            resolve_blocks(model, blocks)
    with model_transaction(model):
        return _prepare(model, cfg, split, blocks)


def _prepare(model: nn.Module, cfg: MethodConfig, split: SparseSplit | None,
             blocks: list[str] | None) -> PreparedMethod:
    spec = get_method(cfg.name)
    opt, report = spec.setup(model, cfg)
    if split is not None:
        params = dict(model.named_parameters())
        training = sorted(n for n in split.prefix_params if params[n].requires_grad)
        if training:
            raise ValueError(f"method {cfg.name!r} trains parameters of the frozen prefix "
                             f"({', '.join(training[:4])}): its setup must leave them frozen "
                             "under update_blocks (see convpeft.methods._prefix_params)")
    if cfg.bn in ("freeze", "stats"):
        frozen_now = [p for _, m in bn_modules(model) for p in m.parameters(recurse=False)
                      if p.requires_grad]
        if frozen_now:
            # the setup trained BN affine; apply the policy and rebuild the (AdamW) optimizer
            _apply_bn_freezing(model, cfg)
            opt = _adamw(model, cfg)
    if cfg.bn == "stats":
        for name, m in bn_modules(model):
            if split is not None and cfg.prefix_bn == "eval" and split.in_prefix(name):
                continue  # the frozen prefix keeps the source model's statistics
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over every target batch seen
    if report is None:
        report = {"trainable": _trainable_names(model), "trainable_params": count_trainable(model),
                  "total_params": sum(p.numel() for p in model.parameters())}
    extra = {}
    if cfg.checkpoint and (blocks is None or blocks):
        extra["checkpoint"] = checkpoint_blocks(model, blocks=blocks)
    if cfg.lean:  # after freezing: frozen layers save only what backward needs (exact)
        extra["lean"] = lean_activations(model)
    if split is not None:  # last: it wraps the forwards lean / checkpointing may have set
        extra["sparse"] = sparse_update(model, cfg.update_blocks, blocks=cfg.sparse_blocks,
                                        prefix_chunks=cfg.prefix_chunks, prefix_bn=cfg.prefix_bn)
    return PreparedMethod(model, opt, cfg, report, count_trainable(model),
                          sum(p.numel() for p in model.parameters()), extra)
