"""Build a model whose parameters and buffers live on the meta device, and nothing else does.

The obvious way, ``with torch.device("meta"): model = factory()``, sends *every* tensor the
constructor creates to the meta device, including the ones a constructor computes its
architecture with: torchvision's RegNet derives its block widths from
``torch.arange(depth)``, ``torch.pow`` and ``torch.round`` and reads them back with
``.tolist()``, which a meta tensor cannot give (``NotImplementedError: Cannot copy out of meta
tensor; no data!``). :func:`on_meta` instead lets the constructor compute on the CPU and moves
each parameter and buffer to the meta device the moment it is registered, so the weight
initialisers that follow run on meta tensors (no data, no time) and the CPU only ever holds
one uninitialised ``torch.empty`` at a time. Tensors kept as plain attributes (not registered)
stay on the CPU, as they would in a CPU build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
_META = torch.device("meta")


@contextmanager
def _registering_on_meta() -> Iterator[None]:
    """Within: ``register_parameter``/``register_buffer`` of any module move the tensor to the
    meta device first (also reached by ``module.weight = nn.Parameter(...)``)."""
    reg_param, reg_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device != _META:
            # the subclass survives (nn.Parameter or a custom one), as does requires_grad
            param = type(param)(param.to(_META), requires_grad=param.requires_grad)
        reg_param(self, name, param)

    def register_buffer(self: nn.Module, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        if tensor is not None and tensor.device != _META:
            tensor = tensor.to(_META)
        reg_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:  # restored whatever the constructor raised
        nn.Module.register_parameter = reg_param  # type: ignore[method-assign]
        nn.Module.register_buffer = reg_buffer  # type: ignore[method-assign]


def on_meta(factory: Callable[[], M]) -> M:
    """``factory()`` with every parameter and buffer on the meta device (module docstring).

    A tensor that reaches a module without registration (assigned over an existing buffer's
    name, or created after construction) is moved at the end, so the returned module holds
    no parameter or buffer data at all.
    """
    with _registering_on_meta():
        net = factory()
    if isinstance(net, nn.Module):
        for mod in net.modules():
            for name, p in mod._parameters.items():
                if p is not None and p.device != _META:
                    mod._parameters[name] = type(p)(p.to(_META), requires_grad=p.requires_grad)
            for name, b in mod._buffers.items():
                if b is not None and b.device != _META:
                    mod._buffers[name] = b.to(_META)
    return net
