"""The methods' registry: a :class:`MethodSpec` per fine-tuning method, found by name
(:func:`get_method`, :func:`list_methods`); :mod:`convpeft.methods.prepare` registers the
built-in ones and :func:`register_method` adds yours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convpeft.core.registry import Registry

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered fine-tuning method; ``setup(model, cfg) -> (optimizer, report or None)``."""

    name: str  # what configs, the CLI and result rows use, e.g. "lora-fa"
    label: str  # display name in plots and reports, e.g. "LoRA-FA"
    description: str
    default_lr: float
    ranked: bool  # takes a rank (adapter rank, GaLore projection rank); sweeps expand over ranks
    # (model, MethodConfig) -> (optimizer, report or None); typed loosely: the config is above
    setup: Callable[[nn.Module, Any], tuple[torch.optim.Optimizer, Any]]


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
