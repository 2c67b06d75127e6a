"""Model-level API: put adapters on a model, report them, merge them away.

Layers are checked before any is wrapped: a conv/linear subclass whose ``forward`` convpeft
cannot reproduce (:mod:`convpeft.core.conv_variants`) is refused with its name and class, and so are
peft's adapter modules (a ``get_peft_model`` result) and everything inside them; the model is
left as it was. Merging folds ``s dW`` into each layer's weight where it can and replaces a
weight-transforming layer (weight-standardised conv) by an equivalent plain one.

A module used at several places (``c = nn.Conv2d(...); nn.Sequential(c, nn.ReLU(), c)``) is one
layer with one weight, so it gets one adapter, put at every place it appears: training sees the
adapted weight at every use, and merging ``W0 + s dW`` into the shared weight is exact for all
of them. :func:`module_names` finds the places (``named_modules()`` yields such a module once,
under its first name, which is the adapter's name in reports and files; ``shared_with`` lists
the others).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from convpeft.core.atomic import model_transaction
from convpeft.core.conv_variants import check_supported_layer
from convpeft.core.layer_kinds import (
    Target,
    check_target,
    layer_kind,
    pattern_list,
    select_layers,
    set_submodule,
)

from .config import AdapterConfig
from .dora import DoRAConv2d, DoRALinear
from .layer import AdapterLayer
from .lora import LoRAConv2d, LoRALinear
from .report import AdapterReport, adapter_layers, adapter_report, is_adapter, module_names

_CLASSES = {
    ("lora", "conv"): LoRAConv2d,
    ("lora", "linear"): LoRALinear,
    ("dora", "conv"): DoRAConv2d,
    ("dora", "linear"): DoRALinear,
}


def foreign_adapter(module: nn.Module) -> str | None:
    """The peft class name if ``module`` is one of peft's adapter layers or wrappers (a
    ``BaseTunerLayer`` such as ``peft.tuners.lora.layer.Conv2d``, or a ``ModulesToSaveWrapper``),
    else None. Found by class, so peft need not be imported."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("peft.") and cls.__name__ in (
                "BaseTunerLayer", "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper"):
            return f"{type(module).__module__}.{type(module).__qualname__}"
    return None


def adapter_for(layer: nn.Module, config: AdapterConfig) -> AdapterLayer:
    """Wrap one ``nn.Conv2d``/``nn.Linear`` with the adapter ``config`` describes (its
    ``rank`` is this layer's: see :meth:`AdapterConfig.for_layer`). A conv/linear subclass with
    a ``forward`` convpeft cannot reproduce raises
    :class:`convpeft.core.conv_variants.UnsupportedLayerError`."""
    kind = layer_kind(layer)
    if kind is None:
        raise TypeError(f"cannot adapt {type(layer).__name__}; only nn.Conv2d and nn.Linear")
    check_supported_layer("", layer)
    return _CLASSES[(config.method, "linear" if kind == "linear" else "conv")](layer, config)


def make_adapter(method: str, layer: nn.Module, rank: int, alpha: float | None = None,
                 **kw: Any) -> AdapterLayer:
    """Wrap one layer: shorthand for ``adapter_for(layer, AdapterConfig(method, rank, alpha,
    **kw))`` (``kw``: any other :class:`AdapterConfig` field)."""
    return adapter_for(layer, AdapterConfig(method=method, rank=rank, alpha=alpha, **kw))


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, put ``model`` back exactly as it was: every submodule the
    block replaced (adapter wrappers keep the original as ``base_layer``, so it is still there),
    every parameter's ``requires_grad``, instance attributes and buffers. The one pattern every
    model-changing call uses, :func:`convpeft.core.atomic.model_transaction`. Parameter *values* are
    the caller's to protect (:func:`convpeft.adapters.state.load_adapter_state_dict` checks
    before it copies)."""
    with model_transaction(model):
        yield


def _kind_counts(model: nn.Module) -> str:
    counts: dict[str, int] = {}
    for _, m in model.named_modules():
        k = layer_kind(m)
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"


MAX_ADAPTER_BYTES = 2**30  # one layer's A + B; far beyond any useful rank on an edge CNN


def _check_adapter_size(name: str, layer: nn.Module, rank: int) -> None:
    """Refuse, before allocating, an adapter larger than :data:`MAX_ADAPTER_BYTES` (a typo'd
    rank would otherwise try to allocate gigabytes, or succeed and train nonsense)."""
    w = layer.weight
    n = rank * (w.shape[0] + w[0].numel())
    nbytes = n * w.element_size()
    if nbytes > MAX_ADAPTER_BYTES:
        raise ValueError(
            f"layer {name!r}: a rank-{rank} adapter needs {nbytes / 2**20:,.0f} MiB ({n:,} "
            f"parameters, the layer itself has {w.numel():,}); ranks above "
            f"min(C_out, C_in/g*k*k) = {min(w.shape[0], w[0].numel())} add no expressiveness: "
            "use a smaller rank or rank_pattern for this layer")


def _refuse_peft_modules(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse layers that are, or sit inside, peft adapter modules (naming both)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".") if name else []
        for i in range(len(parts), -1, -1):
            owner = ".".join(parts[:i])
            if owner in modules and foreign_adapter(modules[owner]) is not None:
                owners.setdefault(owner, []).append(name[len(owner):].lstrip(".") or "itself")
                break
    if owners:
        shown = "; ".join(f"{o or '<model>'} ({foreign_adapter(modules[o])}: "
                          f"{', '.join(inner[:4])}{', ...' if len(inner) > 4 else ''})"
                          for o, inner in list(owners.items())[:6])
        raise ValueError(
            f"these layers belong to peft adapter modules: {shown}; convpeft does not adapt "
            "peft's adapters or their base layers. Fold peft's adapters in first "
            "(model = model.merge_and_unload()), or drop them (model.unload(), "
            "model.get_base_model()); to continue from a peft save, load it onto the plain "
            "model with convpeft.load_adapters(model, directory). Nothing was changed.")


def _owning_adapter(modules: dict[str, nn.Module], name: str) -> str | None:
    """The name of the convpeft adapter that ``name`` is or sits inside, else None."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        owner = ".".join(parts[:i])
        if owner in modules and is_adapter(modules[owner]):
            return owner
    return None


def check_layers(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse, before anything changes, names that are not adaptable layers of ``model``: a
    name the model lacks (``KeyError``), a layer inside peft's adapter modules or convpeft's own
    (``ValueError``), a module that is no ``nn.Conv2d``/``nn.Linear`` (``TypeError``), a
    subclass convpeft cannot reproduce. Every error names the modules and the fix."""
    names = list(names)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in names:
        if name not in modules:
            raise KeyError(f"the model has no layer {name!r}; is it the same architecture?")
    _refuse_peft_modules(model, names)
    owned: dict[str, list[str]] = {}
    for name in names:
        owner = _owning_adapter(modules, name)
        if owner is not None:
            owned.setdefault(owner, []).append(name)
    if owned:
        where = list(owned)
        inner = sorted({n for ns in owned.values() for n in ns} - set(where))
        which = f"layer {where[0]!r} already has an adapter" + (
            f" (so do {', '.join(map(repr, where[1:]))})" if len(where) > 1 else "")
        it = "it" if len(where) == 1 else "them"
        part = (f"; selected {', '.join(inner[:4])}{' ...' if len(inner) > 4 else ''} "
                f"{'is' if len(inner) == 1 else 'are'} part of {it}" if inner else "")
        raise ValueError(f"{which}; call merge_adapters(model) first, or exclude {it} "
                         f"(exclude={where!r}){part}")
    if "" in names and layer_kind(model) is not None:
        raise ValueError("the model itself is a single layer; wrap it in nn.Sequential first")
    others = [f"{n or '<model>'} ({type(modules[n]).__name__})" for n in names
              if layer_kind(modules[n]) is None]
    if others:
        raise TypeError(
            f"cannot adapt {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}: adapters "
            "wrap only nn.Conv2d and nn.Linear layers; select only those (a target kind, or a "
            "callable target returning True for them alone)")
    for name in names:
        check_supported_layer(name, modules[name])


def wrap_layers(model: nn.Module, configs: dict[str, AdapterConfig],
                shared: dict[str, list[str]] | None = None) -> list[str]:
    """Replace each named layer by the adapter ``configs[name]`` describes; return the
    adapters' names (a shared module's first name, see :func:`module_names`). A module used at
    several places gets one adapter, put at every place. Refuses (:func:`check_layers`) layers
    that already are, or sit inside, an adapter (convpeft's or peft's), and two names of one
    module.

    ``shared`` (from a saved file: ``{name: the other places it was used at}``): refuse a layer
    this model uses at other places than the file says, since the adapter was trained for
    those uses."""
    check_layers(model, configs)
    modules = dict(model.named_modules(remove_duplicate=False))
    places = module_names(model)
    seen: dict[int, str] = {}
    for name in configs:
        if id(modules[name]) in seen:
            raise ValueError(
                f"layers {seen[id(modules[name])]!r} and {name!r} are one module used at two "
                f"places; adapt it once (under {places[id(modules[name])][0]!r}): its adapter "
                "serves every place")
        seen[id(modules[name])] = name
        if shared is not None:
            others = [n for n in places[id(modules[name])] if n != name]
            if sorted(others) != sorted(shared.get(name, [])):
                raise ValueError(
                    f"field 'layers.{name}.shared_with' is {shared.get(name, [])!r}, but this "
                    f"model uses layer {name!r} at {others or 'no other place'!r} besides: the "
                    "adapter was trained for the uses the file lists (one module shared by "
                    "them); build the model as the saved one was, or re-save from this one")
    out = []
    for name, config in configs.items():
        layer = modules[name]
        wrapper = adapter_for(layer, config)
        for place in places[id(layer)]:
            set_submodule(model, place, wrapper)
        out.append(places[id(layer)][0])
    return out


def set_trainable(model: nn.Module, trainable: Iterable[str] | None) -> list[str]:
    """Freeze every parameter except adapter ones and those matching a ``trainable`` regex.

    Returns the names of the non-adapter parameters left trainable.
    """
    trainable = pattern_list(trainable, what="trainable")
    patterns = [re.compile(p) for p in trainable]
    adapter_ids = {id(p) for _, m in adapter_layers(model) for p in m.adapter_parameters()}
    train_ids = {id(p) for _, m in adapter_layers(model) for p in m.trainable_adapter_parameters()}
    kept = []
    for n, p in model.named_parameters():
        if id(p) in adapter_ids:
            p.requires_grad_(id(p) in train_ids)  # LoRA-FA's A stays frozen
        elif any(pat.search(n) for pat in patterns):
            p.requires_grad_(True)
            kept.append(n)
        else:
            p.requires_grad_(False)
    if patterns and not kept:
        raise ValueError(
            f"trainable={list(trainable or [])!r} matched no parameter name; names look like "
            f"{[n for n, _ in list(model.named_parameters())[-2:]]!r}"
        )
    return kept


def apply_adapters(
    model: nn.Module,
    method: str | AdapterConfig = "lora",
    rank: int = 8,
    *,
    alpha: float | None = None,
    target: Target = "conv",
    exclude: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    mode: str = "auto",
    trainable: list[str] | None = None,
    rslora: bool = False,
    dropout: float = 0.0,
    freeze_a: bool = False,
) -> AdapterReport:
    """Wrap the selected layers of ``model`` with LoRA/DoRA adapters, in place.

    ``target``: a layer kind (``conv``, ``standard``, ``pointwise``, ``depthwise``, ``grouped``,
    ``linear``, ``all``), a list of them or a callable ``(name, module) -> bool``; ``exclude``:
    name regexes to skip; ``rank_pattern``: ``{regex: rank}`` overrides (first match wins);
    ``alpha``: ``None`` means ``alpha = rank`` per layer. ``mode``: ``"activation"``,
    ``"weight"`` or ``"auto"`` (see :mod:`convpeft.adapters.lora`). Every parameter that is not
    an adapter's is frozen unless its name matches a ``trainable`` regex (e.g. ``["^fc\\."]``).
    ``freeze_a=True`` is LoRA-FA: ``A`` stays at its random init and only ``B`` (and DoRA's
    magnitude) trains; a LoRA conv then saves ``A x`` (``g r`` channels) for backward instead of
    ``x`` wherever that is smaller (not on most depthwise layers, where ``g r > C_in``).
    Returns an :class:`AdapterReport` of the layers adapted by this call (totals cover the model).
    ``method`` may instead be an :class:`AdapterConfig` holding all of these settings (then pass
    nothing else).

    Calling it again on *other* layers is allowed (e.g. DoRA on the pointwise convs, LoRA on
    the depthwise ones); each call re-applies the freezing rule, so pass ``trainable`` again.
    Layers that already carry an adapter are refused: merge first or exclude them. So is a
    peft-wrapped model's adapter machinery (``get_peft_model``'s LoRA layers, their
    ``base_layer``, ``lora_A``/``lora_B``): fold peft's adapters in first
    (``merge_and_unload()``) or adapt the plain model.

    Shared modules: a conv/linear used at several places (``c`` in ``nn.Sequential(c,
    nn.ReLU(), c)``) is one weight, so it gets one adapter, placed at every use. Training then
    adapts every use alike, merging folds ``W0 + s dW`` into the one shared weight (exact for
    every use), and the report (``also at ...``), ``save_adapters`` (``shared_with`` in the
    config) and ``load_adapters`` (refuses a model that shares it differently) say so. The
    layer is named as ``named_modules()`` names it (its first place).
    """
    if isinstance(method, AdapterConfig):
        cfg = method
    else:
        cfg = AdapterConfig(
            method=method, rank=rank, alpha=alpha, target=target,
            exclude=pattern_list(exclude, what="exclude"), rank_pattern=rank_pattern, mode=mode,
            trainable=pattern_list(trainable, what="trainable"), rslora=rslora, dropout=dropout,
            freeze_a=freeze_a)
    pattern_list(list(cfg.rank_pattern or {}), what="rank_pattern")
    check_target(cfg.target)
    chosen = select_layers(model, cfg.target, cfg.exclude)
    if not chosen:
        raise ValueError(
            f"target={cfg.target!r} (exclude={cfg.exclude!r}) matched no layer; this model has: "
            f"{_kind_counts(model)}. Pick one of those kinds or loosen exclude."
        )
    check_layers(model, [name for name, _ in chosen])  # names what cannot be adapted, and why
    configs = {name: cfg.for_layer(name) for name, _ in chosen}
    for name, layer in chosen:
        _check_adapter_size(name, layer, configs[name].rank)
    with all_or_nothing(model):
        names = wrap_layers(model, configs)
        set_trainable(model, cfg.trainable)
    return adapter_report(model, names)


def merge_adapters(model: nn.Module, *, unload: bool = True) -> nn.Module:
    """Fold every adapter into its layer, in place, and return ``model``.

    With ``unload=True`` (default) each wrapper is replaced by its plain ``nn.Conv2d`` /
    ``nn.Linear`` (weight ``W0 + s dW``, or DoRA's ``c (W0 + s dW)``; trainability as before
    the adapter was applied) and no adapter module is left. A layer that transforms its stored
    weight (timm's weight-standardised ``StdConv2d``/``ScaledStdConv2d``...) cannot hold
    ``W0_eff + s dW``: it is replaced by an equivalent plain conv holding the merged effective
    weight (``nn.Conv2d``, or timm's ``Conv2dSame`` for dynamic "SAME" padding), exact and
    deployable. With ``unload=False`` the wrappers stay, merged, and :func:`unmerge_adapters`
    restores them exactly; that is refused (before anything is merged) if any layer cannot fold.
    """
    layers = adapter_layers(model)
    if not unload:
        stuck = [f"{n} ({type(m.base_layer).__name__})" for n, m in layers if not m.folds_in_place]
        if stuck:
            raise ValueError(
                f"merge_adapters(model, unload=False) cannot merge {', '.join(stuck)}: these "
                "layers transform their stored weight (e.g. weight standardisation), so "
                "W0 + s*dW cannot be written back into them reversibly. Use "
                "merge_adapters(model) (unload=True), which replaces each by an equivalent plain "
                "conv holding the merged effective weight; nothing was merged.")
    elif any(n == "" for n, _ in layers):
        raise ValueError("the model itself is an adapter; use model.unload() instead")
    if not unload:
        for _, m in layers:
            m.merge()
        return model
    # replacements first (they change nothing), so a failure leaves the model as it was
    replacements = {name: m.plain_layer() for name, m in layers if not m.folds_in_place}
    places = module_names(model)
    for name, m in layers:
        new = replacements[name] if name in replacements else m.unload()
        for place in places[id(m)]:  # every use of a shared module
            set_submodule(model, place, new)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters(model, unload=False)`` exactly."""
    for _, m in adapter_layers(model):
        m.unmerge()
    return model


__all__ = [
    "all_or_nothing", "adapter_for", "apply_adapters", "check_layers", "foreign_adapter",
    "make_adapter", "merge_adapters", "set_trainable",
    "unmerge_adapters", "wrap_layers",
]
