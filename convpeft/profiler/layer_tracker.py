"""Which layer of a model an op runs for, in forward and in backward.

The FLOP counter asks :meth:`LayerTracker.layer_of` for every op when per-layer rows are wanted.
Forward is easy (module hooks keep a stack); backward runs outside any module call, so each
module's forward hook labels the autograd nodes behind its outputs and backward ops look up the
node that is running.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from convpeft.core.layer_kinds import layer_kind
from convpeft.memory.checkpoint import recomputing

_LAYER_KEY = "convpeft_layer"


class LayerTracker:
    """Attributes ops to the innermost module of ``model`` running them.

    Forward: a stack maintained by global module pre/post hooks. Backward: each module's post
    hook labels the not-yet-labelled autograd nodes behind its outputs (``node.metadata``), and
    ``torch._C._current_autograd_node()`` tells which node a backward op runs for.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules() if n}
        # an adapter wrapper reports the kind of the layer it wraps (``.base_layer``)
        self.kinds = {n: layer_kind(getattr(m, "base_layer", m)) for n, m in model.named_modules()
                      if n}
        self.stack: list[str] = []
        self.phase = "forward"
        self._handles: list = []

    def __enter__(self) -> LayerTracker:
        reg = torch.nn.modules.module
        self._handles = [reg.register_module_forward_pre_hook(self._pre),
                         reg.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module: nn.Module, args) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append(name)

    def _post(self, module: nn.Module, args, output) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        todo = [t.grad_fn for t in tree_flatten(output)[0]
                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or _LAYER_KEY in node.metadata:
                continue
            node.metadata[_LAYER_KEY] = name
            todo.extend(nf for nf, _ in node.next_functions if nf is not None)

    def layer_of(self) -> str | None:
        # a checkpointed block recomputing in backward runs module hooks: the stack is right
        if self.phase == "backward" and not recomputing():
            node = torch._C._current_autograd_node()
            return None if node is None else node.metadata.get(_LAYER_KEY)
        return self.stack[-1] if self.stack else None
