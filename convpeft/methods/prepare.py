"""Turning a model into one ready to fine-tune with a method: which parameters train, the
optimizer, the BN policy, and the memory techniques the config asks for (:func:`prepare`); the
built-in methods, registered in :mod:`convpeft.methods.registry`. The methods and their
settings are described in :mod:`convpeft.methods`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from convpeft.adapters import apply_adapters
from convpeft.core.atomic import model_transaction
from convpeft.core.layer_kinds import select_layers
from convpeft.memory.checkpoint import checkpoint_blocks, resolve_blocks
from convpeft.memory.lean import lean_activations
from convpeft.memory.sparse import SparseSplit, check_sparse, sparse_update
from convpeft.models import get_head
from convpeft.optim import galore_optimizer

from .config import BN_POLICIES, MethodConfig
from .registry import MethodSpec, get_method, register_method

__all__ = ["PreparedMethod", "bn_modules", "count_trainable", "prepare", "set_bn_mode"]


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
    (:func:`convpeft.core.atomic.model_transaction`).
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
                             "under update_blocks (see convpeft.methods.prepare._prefix_params)")
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
