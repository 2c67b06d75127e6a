"""Adapter state: what to keep of a fine-tuned model besides its frozen backbone.

A directory written by :func:`save_adapters` holds

* ``adapter_config.json``: per adapted layer its method, rank, alpha, rsLoRA flag, mode and
  dropout, plus the names of the extra trainable parameters, so :func:`load_adapters` can
  rebuild the same wrappers on a freshly built backbone;
* ``adapter_model.safetensors`` (``adapter_model.pt`` if safetensors is not installed): the
  adapter parameters, the other trainable parameters (e.g. a new head) and, by default, the
  model's buffers. Buffers are included because fine-tuning in train mode moves batch-norm
  running statistics, and without them the reloaded model would not reproduce the outputs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import AdapterReport, adapter_layers, adapter_report, set_trainable, wrap_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_PT = "adapter_model.pt"
FORMAT = "convpeft-adapters"


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
    model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Copy ``state`` (from :func:`adapter_state_dict`) into ``model``, which must already carry
    the same adapters. With ``strict``, every adapter parameter of the model must be present."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    unknown = [k for k in state if k not in targets]
    if unknown:
        raise KeyError(
            f"adapter state has entries the model lacks: {unknown[:5]!r}; apply the same adapters "
            "first (or use load_adapters(model, directory), which re-applies the saved config)"
        )
    missing = [k for k in _adapter_param_names(model) if k not in state]
    if strict and missing:
        raise KeyError(
            f"adapter state lacks {missing[:5]!r}; it was saved from a model with other adapters "
            "(pass strict=False to load what is there)"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ValueError(
                f"adapter state {k!r} has shape {tuple(v.shape)} but the model's is "
                f"{tuple(targets[k].shape)}: it was saved with another rank/target/architecture; "
                "apply_adapters with the saved settings or use load_adapters(model, directory)"
            )
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v)


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {"method": m.method, "rank": m.rank, "alpha": m.alpha, "rslora": m.rslora,
               "mode": m.mode, "dropout": m.dropout_p}
        for name, m in adapter_layers(model)
    }


def save_adapters(model: nn.Module, directory: str | os.PathLike, *,
                  include_buffers: bool = True) -> Path:
    """Write the adapter config and state of ``model`` to ``directory`` (created if needed)."""
    if not adapter_layers(model):
        raise ValueError("the model has no adapters to save; call apply_adapters first")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    adapter_names = set(_adapter_param_names(model))
    extra = [n for n, p in model.named_parameters() if p.requires_grad and n not in adapter_names]
    config = {"format": FORMAT, "version": 1, "layers": _layer_specs(model), "trainable": extra}
    (d / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous().clone() for k, v in
             adapter_state_dict(model, include_buffers=include_buffers).items()}
    try:
        from safetensors.torch import save_file
    except ImportError:  # optional dependency: torch.save, read back with weights_only=True
        torch.save(state, d / WEIGHTS_NAME_PT)
    else:
        save_file(state, str(d / WEIGHTS_NAME))
    return d


def _read_state(d: Path) -> dict[str, torch.Tensor]:
    if (d / WEIGHTS_NAME).exists():
        from safetensors.torch import load_file

        return load_file(str(d / WEIGHTS_NAME))
    if (d / WEIGHTS_NAME_PT).exists():
        return torch.load(d / WEIGHTS_NAME_PT, weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_NAME_PT} in {d}")


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> AdapterReport:
    """Re-apply the adapters saved in ``directory`` to ``model`` (a freshly built backbone with
    the same base weights) and load their state; the result reproduces the saved model."""
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found; was it written by save_adapters?")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a {FORMAT} config")
    names = wrap_layers(model, config["layers"])
    set_trainable(model, [f"^{re.escape(n)}$" for n in config.get("trainable", [])])
    load_adapter_state_dict(model, _read_state(d))
    return adapter_report(model, names)
