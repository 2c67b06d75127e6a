"""Which lean activations feed a layer that saves their output anyway: one forward on meta.

A 1-bit mask saves 31/32 of an activation's output only when nothing else keeps that output
for backward. In a ResNet with adapters on every conv, each ReLU feeds an adapted conv, which
saves its input for the adapter's ``A``: the output is pinned anyway and the mask is pure
overhead (1/32 more memory, two more passes). There the activation should save its output
itself (the same storage, no extra bytes), which also spares ReLU6 / Hardtanh from keeping
their *input*, as torch's own backward would. Not quite free: the output then lives until the
activation's own backward, one layer past the consumer's, so one extra tensor is alive there;
that beats a mask per layer held from forward to backward, except inside a checkpointed block,
where only one block's masks are alive at a time and the lean forward keeps them
(:func:`convpeft.memory.checkpoint.in_checkpointed_block`).

Who saves what depends on the graph, not on the module tree, so :func:`outputs_saved_downstream`
runs the (already lean) model once on a meta copy, which computes nothing and allocates
nothing, and watches ``saved_tensors_hooks``: an activation's output is *shared* when a later
op saves a tensor of the same storage. Meta tensors keep distinct storages per allocation
(views share one), and every output is held until the forward ends, so no storage is reused
and mistaken for another. The answer is a property of the graph and the frozen/trainable
flags at this moment (like the rest of :func:`convpeft.lean_activations`); an input of
another size gives the same answer for CNNs. A wrong answer would cost memory, never
correctness: both modes compute the same gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from convpeft.core.accounting import meta_copy, storage_key

__all__ = ["example_shape", "outputs_saved_downstream"]

PROBE_SIZE = 64
"""Side of the probe's input when no shape is given (meta: costs nothing; large enough for
every torchvision CNN's downsampling)."""


def example_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``(2, C, 64, 64)`` with ``C`` the first conv's input channels; None without a conv."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (2, m.in_channels, PROBE_SIZE, PROBE_SIZE)
    return None


def outputs_saved_downstream(model: nn.Module, names: Iterable[str],
                             input_shape: Sequence[int] | None = None) -> set[str]:
    """The modules among ``names`` whose forward output (every call's) is saved for backward
    by another op in one forward of ``model`` (on a meta copy; ``model`` is not touched, its
    train/eval modes and requires_grad flags are used as they are). Raises whatever the
    forward raises (the caller decides what to fall back to)."""

    wanted = set(names)
    if not wanted:
        return set()
    shape = tuple(input_shape) if input_shape is not None else example_shape(model)
    if shape is None:
        raise ValueError("no input shape: the model has no nn.Conv2d to infer it from")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    meta = meta_copy(model)
    outputs: dict[str, list[torch.Tensor]] = {}  # held to the end: no storage is reused
    owner: list[str | None] = [None]
    saved_by_others: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if owner[0] is None and t.device.type == "meta":
            saved_by_others.add(storage_key(t))
        return t

    handles = []
    for name, m in meta.named_modules():
        if name not in wanted:
            continue

        def pre(_m, _args, name=name) -> None:
            owner[0] = name  # what the activation itself saves is not "downstream"

        def post(_m, _args, out, name=name) -> None:
            owner[0] = None
            if isinstance(out, torch.Tensor):
                outputs.setdefault(name, []).append(out)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            meta(torch.empty(shape, device="meta", dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    # a module called twice (torchvision's BasicBlock reuses its ReLU) shares only if every
    # call's output is saved downstream: the flag is per module
    return {n for n, outs in outputs.items()
            if all(storage_key(o) in saved_by_others for o in outs)}
