"""What autograd keeps for backward, by layer: ``saved_tensors_hooks`` over one forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["saved_bytes_by_layer"]


def saved_bytes_by_layer(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Bytes autograd keeps for backward after one forward of ``example_input``, by the
    innermost module that saved them (``""``: outside any module).

    Each storage counts once, for the first layer that saves it (a tensor saved by two ops,
    e.g. an adapter's input kept for both the base conv and ``A``, is one allocation);
    parameters and buffers are left out (resident anyway), so this is the activation memory a
    backward pass pins. Use a real (CPU/GPU) input: meta tensors have no storage to tell
    apart. The forward leaves the model as it was: buffers (BN running statistics in train
    mode) are restored afterwards, and no gradient is computed.
    """
    if example_input.device.type == "meta":
        raise ValueError("saved_bytes_by_layer needs a real example input (meta tensors share "
                         "no storage identity); pass e.g. torch.randn(shape)")
    resident = {t.untyped_storage().data_ptr() for t in
                [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    stack: list[str] = [""]
    out: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s.data_ptr()
        if s.nbytes() and key not in resident and key not in seen:
            seen.add(key)
            out[stack[-1]] = out.get(stack[-1], 0) + s.nbytes()
        return t

    def enter(name: str) -> Callable:
        def hook(*_args) -> None:
            stack.append(name)
        return hook

    def leave(*_args) -> None:  # returning None keeps the module's output
        stack.pop()

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return out
