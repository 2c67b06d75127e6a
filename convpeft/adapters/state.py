"""Adapter state: what to keep of a fine-tuned model besides its frozen backbone.

A directory written by :func:`save_adapters` holds

* ``adapter_config.json``: per adapted layer its method, rank, alpha, rsLoRA flag, mode and
  dropout (and ``shared_with``, the other places of a module used at several), plus the names
  of the extra trainable parameters (``trainable``) and of the buffers saved (``buffers``), so
  :func:`load_adapters` can rebuild the same wrappers on a freshly built backbone;
* ``adapter_model.safetensors`` (``adapter_model.pt`` if safetensors is not installed): the
  adapter parameters, the other trainable parameters (e.g. a new head) and, by default, the
  model's buffers. Buffers are included because fine-tuning in train mode moves batch-norm
  running statistics, and without them the reloaded model would not reproduce the outputs.

An adapter file is input from elsewhere, so loading is confined and all-or-nothing: only adapter
tensors, the parameters the config declares trainable and the buffers it lists are accepted (a
file carrying ``...base_layer.weight``, any other frozen weight or a buffer its config does not
list is refused, the keys named; a config without ``buffers``, as written before that field
existed, allows none); the config and the weights are read and checked before the model is
touched, and any failure leaves the model exactly as it was, so a retry with good files works.

Saving is all-or-nothing too (:mod:`convpeft.adapters.files`): both files are serialised and
written to a temporary folder first, then renamed over the old ones, replacing (never following)
a symlink at either name; a failed save leaves the previous save as it was, and it still loads.

``save_adapters(..., format="peft")`` writes peft's LoRA format instead, which
``peft.PeftModel.from_pretrained`` loads, and :func:`load_adapters` reads such directories too
(recognised by ``peft_type`` in the config); the translation, and what peft cannot represent,
is in :mod:`convpeft.adapters.peft_format`.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .files import write_files
from .model import (
    AdapterReport,
    adapter_layers,
    adapter_report,
    all_or_nothing,
    module_names,
    set_trainable,
    wrap_layers,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_PT = "adapter_model.pt"
FORMAT = "convpeft-adapters"
SAVE_FORMATS = ("convpeft", "peft")


def _adapter_param_names(model: nn.Module) -> list[str]:
    names = []
    for lname, m in adapter_layers(model):
        prefix = f"{lname}." if lname else ""
        for pname, p in m.named_parameters(recurse=False):
            if any(p is q for q in m.adapter_parameters()):
                names.append(prefix + pname)
    return names


def adapter_state_dict(
    model: nn.Module, *, include_trainable: bool = True, include_buffers: bool = True
) -> dict[str, torch.Tensor]:
    """``{qualified name: tensor}`` of the adapter parameters of ``model``.

    ``include_trainable`` adds every other parameter with ``requires_grad`` (e.g. a head kept
    trainable), ``include_buffers`` every buffer (batch-norm statistics). Tensors are detached
    references, not copies.
    """
    names = set(_adapter_param_names(model))
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if n in names or (include_trainable and p.requires_grad):
            out[n] = p.detach()
    if include_buffers:
        for n, b in model.named_buffers():
            out[n] = b.detach()
    return out


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
    buffers: Iterable[str] | None = None,
) -> None:
    """Copy ``state`` (from :func:`adapter_state_dict`) into ``model``, which must already carry
    the same adapters. Only adapter parameters, parameters that are trainable now and buffers
    (those named in ``buffers`` if given, e.g. a file's declared ones; default any) are
    accepted: an entry naming a frozen weight (e.g. a ``base_layer.weight``) is refused.
    With ``strict``, every adapter parameter of the model must be present. Everything is
    checked before the first copy, so a refused state changes nothing. Layers merged with
    ``merge_adapters(model, unload=False)`` stay merged, with the loaded adapter folded in."""
    params = dict(model.named_parameters())
    adapter_names = set(_adapter_param_names(model))
    targets: dict[str, torch.Tensor] = {
        n: p for n, p in params.items() if n in adapter_names or p.requires_grad}
    model_buffers = dict(model.named_buffers())
    allowed = None if buffers is None else set(buffers)
    undeclared = [k for k in state if k in model_buffers and allowed is not None
                  and k not in allowed]
    if undeclared:
        raise KeyError(
            f"adapter state would overwrite buffers its config does not list (field "
            f"'buffers'): {undeclared[:5]!r}{' ...' if len(undeclared) > 5 else ''}; a file may "
            "only set the buffers it was saved with. Re-save it with save_adapters (which lists "
            "them), or, if you trust the file, add those names to 'buffers' in its "
            "adapter_config.json")
    targets.update({n: b for n, b in model_buffers.items() if allowed is None or n in allowed})
    frozen = [k for k in state if k in params and k not in targets]
    if frozen:
        raise KeyError(
            f"adapter state would overwrite frozen weights of the model: {frozen[:5]!r}"
            f"{' ...' if len(frozen) > 5 else ''}; an adapter file may only hold adapter "
            "tensors, the trainable parameters its config names and buffers"
        )
    unknown = [k for k in state if k not in targets]
    if unknown:
        raise KeyError(
            f"adapter state has entries the model lacks: {unknown[:5]!r}; apply the same adapters "
            "first (or use load_adapters(model, directory), which re-applies the saved config)"
        )
    missing = [k for k in adapter_names if k not in state]
    if strict and missing:
        raise KeyError(
            f"adapter state lacks {sorted(missing)[:5]!r}; it was saved from a model with other "
            "adapters (pass strict=False to load what is there)"
        )
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"adapter state {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ValueError(
                f"adapter state {k!r} has shape {tuple(v.shape)} but the model's is "
                f"{tuple(targets[k].shape)}: it was saved with another rank/target/architecture; "
                "apply_adapters with the saved settings or use load_adapters(model, directory)"
            )
    # a merged layer (merge_adapters(model, unload=False)) computes with W0 + s dW folded in:
    # unmerge it, load, merge again, so the weight in use follows the loaded adapter
    merged = [m for _, m in adapter_layers(model) if m.merged]
    with torch.no_grad():
        for m in merged:
            m.unmerge()
        try:
            for k, v in state.items():
                targets[k].copy_(v)
        finally:
            for m in merged:
                m.merge()


def save_adapters(model: nn.Module, directory: str | os.PathLike, *,
                  include_buffers: bool = True, format: str = "convpeft") -> Path:
    """Write the adapter config and state of ``model`` to ``directory`` (created if needed).

    ``format="peft"`` writes peft's LoRA format (loadable with
    ``peft.PeftModel.from_pretrained(base_model, directory)``) for the layers peft can represent
    and refuses the others, naming them, before anything is written (see
    :mod:`convpeft.adapters.peft_format`).

    All or nothing: everything is serialised first and the files are replaced together (a
    symlink at either name is replaced, never written through); on failure the directory holds
    the previous save, which still loads. A layer shared by several places is saved once, its
    other places in ``shared_with``; the buffers saved are listed in ``buffers``."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r} is unknown; use one of {', '.join(SAVE_FORMATS)}")
    if format == "peft":
        from .peft_format import save_peft

        return save_peft(model, directory, include_buffers=include_buffers)
    if not adapter_layers(model):
        raise ValueError("the model has no adapters to save; call apply_adapters first")
    adapter_names = set(_adapter_param_names(model))
    extra = [n for n, p in model.named_parameters() if p.requires_grad and n not in adapter_names]
    places = module_names(model)
    layers = {}
    for name, m in adapter_layers(model):
        layers[name] = m.config.layer_dict()
        if len(places[id(m)]) > 1:  # one module used at several places: one adapter for all
            layers[name]["shared_with"] = places[id(m)][1:]
    state = adapter_state_dict(model, include_buffers=include_buffers)
    buffer_names = {n for n, _ in model.named_buffers()}
    config = {"format": FORMAT, "version": 2, "layers": layers, "trainable": extra,
              "buffers": [k for k in state if k in buffer_names]}
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise ValueError(
            f"cannot save adapters: {meta[:3]!r}{' ...' if len(meta) > 3 else ''} are on the "
            "meta device (shapes without values); materialise the model first (e.g. "
            "model.to_empty(device='cpu'), then load or initialise its weights); nothing was "
            "written")
    state = {k: v.contiguous().clone() for k, v in state.items()}
    try:
        from safetensors.torch import save as st_save
    except ImportError:  # optional dependency: torch.save, read back with weights_only=True
        buf = io.BytesIO()
        torch.save(state, buf)
        name, blob, other = WEIGHTS_NAME_PT, buf.getvalue(), WEIGHTS_NAME
    else:
        name, blob, other = WEIGHTS_NAME, st_save(state), WEIGHTS_NAME_PT
    # everything serialised: now replace the files together (a stale weights file of the
    # other kind would be read instead, so it goes too)
    return write_files(directory, {name: blob, CONFIG_NAME: json.dumps(config, indent=2).encode()},
                       remove=[other])


def _read_state(d: Path) -> dict[str, torch.Tensor]:
    if (d / WEIGHTS_NAME).exists():
        from safetensors.torch import load_file

        path = d / WEIGHTS_NAME
        try:
            return load_file(str(path))
        except Exception as e:  # truncated / garbled: safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if (d / WEIGHTS_NAME_PT).exists():
        path = d / WEIGHTS_NAME_PT
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable adapter state ({e})") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
        return state
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_NAME_PT} in {d}")


_LAYER_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,), "rank": (int,), "alpha": (int, float, type(None)), "rslora": (bool,),
    "mode": (str,), "dropout": (int, float), "freeze_a": (bool,), "shared_with": (list,),
}


def _read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` parsed and checked field by field; errors name the file and
    the field."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; was it written by save_adapters?")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if "peft_type" in config:  # peft's format: checked field by field in peft_format.read_peft
        return {"format": "peft", "peft": config}
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} config (field 'format' is "
                         f"{config.get('format')!r})")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: field 'layers' must be a non-empty object "
                         f"{{layer name: settings}}, got {layers!r:.80}")
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: field 'layers.{name}' must be an object")
        for key in ("method", "rank"):
            if key not in spec:
                raise ValueError(f"{path}: field 'layers.{name}.{key}' is missing")
        for key, value in spec.items():
            allowed = _LAYER_FIELDS.get(key)
            if allowed is None:
                raise ValueError(f"{path}: unknown field 'layers.{name}.{key}'")
            if not isinstance(value, allowed) or (key == "rank" and isinstance(value, bool)) or (
                    key == "shared_with" and not all(isinstance(n, str) for n in value)):
                raise ValueError(f"{path}: field 'layers.{name}.{key}' has the wrong type "
                                 f"({value!r})")
    for key, what in (("trainable", "parameter"), ("buffers", "buffer")):
        names = config.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: field {key!r} must be a list of {what} names")
    return config


def _layer_configs(path: Path, layers: dict[str, dict[str, Any]]) -> dict[str, AdapterConfig]:
    """One validated :class:`AdapterConfig` per saved layer; errors name the file and field."""
    out = {}
    for name, spec in layers.items():
        try:
            out[name] = AdapterConfig.from_layer_dict(spec)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: field 'layers.{name}' is invalid: {e}") from e
    return out


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> AdapterReport:
    """Re-apply the adapters saved in ``directory`` to ``model`` (a freshly built backbone with
    the same base weights) and load their state; the result reproduces the saved model.

    All or nothing: the config and the weights are read and checked first; if anything fails
    (malformed config, truncated or garbled weights, a layer the model lacks, a shape
    mismatch, a tensor outside the adapter's scope, a buffer the config does not list, a layer
    this model shares between other places than the saved one) the model is left exactly as it
    was.

    A directory in peft's LoRA format (``adapter_config.json`` with ``peft_type``) is read too:
    see :mod:`convpeft.adapters.peft_format` for what it may hold."""
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    config = _read_config(cfg_path)
    peft = config.get("format") == "peft"
    shared: dict[str, list[str]] | None = None
    buffers: list[str] | None = None  # peft: confined to modules_to_save by read_peft
    if not peft:
        configs = _layer_configs(cfg_path, config["layers"])
        trainable = config.get("trainable", [])
        shared = {n: spec.get("shared_with", []) for n, spec in config["layers"].items()}
        buffers = config.get("buffers", [])  # absent (an older save): none
    state = _read_state(d)
    if peft:
        from .peft_format import read_peft

        layers, trainable, state = read_peft(model, config["peft"], state, cfg_path)
        configs = _layer_configs(cfg_path, layers)
    with all_or_nothing(model):
        try:
            names = wrap_layers(model, configs, shared)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{cfg_path}: field 'layers' does not fit this model: {e}") from e
        set_trainable(model, [f"^{re.escape(n)}$" for n in trainable])
        load_adapter_state_dict(model, state, buffers=buffers)
    return adapter_report(model, names)
