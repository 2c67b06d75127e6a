"""Block-level activation checkpointing, exact and reversible, for any fine-tuning method.

:func:`checkpoint_blocks` makes each chosen block of a backbone (a residual block, an inverted
residual, a stage) run under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: the
forward keeps only the block's *input* for backward, and the block is run again, in backward,
to recompute what its layers saved. Peak memory then holds the block inputs plus one block's
saved tensors at a time, for one extra forward of the checkpointed blocks (the profiler counts
it: recomputed FLOPs go to ``flops_forward``).

Exact: outputs and every gradient are those of the plain model (the same kernels run on the same
inputs; the RNG state is replayed, so dropout / stochastic depth inside a block draw the same
masks). BatchNorm in train mode would update its running statistics a second time during the
recomputation; while a block recomputes, its train-mode BNs write into throw-away copies of
their running statistics (same op, same batch statistics, same saved tensors), so
``running_mean``/``running_var``/``num_batches_tracked`` end exactly as one plain forward
leaves them.

Blocks (``blocks=None``, auto-detected):

* torchvision ResNet / ResNeXt / Wide ResNet: the children of ``layer1`` ... ``layerN``
  (``layer1.0``, ``layer1.1``, ... the residual blocks);
* otherwise the children of the ``nn.Sequential`` holding the most parameters that are blocks
  (containers with parameters; an adapter wrapping one layer is not one): MobileNetV2/V3,
  EfficientNet, MNASNet, RegNet ``features[i]`` / stages. (A Sequential of bare layers, e.g.
  VGG's, has no block to pick: name the blocks.)
* where there is none, or it lies inside a module that is not a Sequential (GoogLeNet: one
  branch of an inception module, whose branches run side by side), the model's own children
  that are blocks (GoogLeNet ``conv1`` ... ``inception5b``, Inception-v3): their forward runs
  those as a chain.

Or ``blocks=[names]``: any submodules, not nested in one another, that are not bare layers of
a kind :func:`convpeft.lean_activations` swaps (a single conv/BN/activation gains nothing: its
input is what it saves anyway). Like ``lean_activations``, the ``forward`` of each block is
swapped on the instance (``state_dict`` unchanged; works before or after adapters and lean
activations; survives ``copy.deepcopy``, so the analytic profiler traces it on the meta device);
:meth:`CheckpointReport.undo` / :func:`restore_checkpointing` put the plain forward back.
Under ``torch.no_grad()`` (evaluation) and inside ``torch.func`` transforms (which support no
saved-tensor hooks) a block runs its plain forward.

Memory accounting caveat: the recomputed tensors are held by the checkpoint, outside autograd's
``saved_tensors_hooks``, so the profiler files them under ``temporaries``, not
``activations`` (the peak itself is exact).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from convpeft.core.atomic import model_transaction
from convpeft.memory.forwards import foreign_forward, remove_forward, set_forward, undo_marked

__all__ = ["CheckpointReport", "checkpoint_blocks", "detect_blocks", "in_checkpointed_block",
           "recomputing", "resolve_blocks", "restore_checkpointing"]

_OWNER = "_convpeft_checkpoint_owner"  # the report whose call wrapped the block (see undo)
_MARK = "_convpeft_checkpoint"  # attribute on a checkpointed block: its name in the model
_STATE = threading.local()

# bare layers that gain nothing from checkpointing (and whose forward lean_activations swaps)
_BARE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm,
         nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Hardswish, nn.SiLU, nn.GELU)


def recomputing() -> bool:
    """True while a checkpointed block re-runs its forward during backward (this thread).
    The profiler's FLOP counter uses it to book that work as forward FLOPs."""
    return getattr(_STATE, "depth", 0) > 0


def in_checkpointed_block() -> bool:
    """True while a checkpointed block runs, in its first forward or its recomputation (this
    thread): what a layer saves must be the same in both (torch checks it), and
    :mod:`convpeft.memory.lean` keeps its activation masks there."""
    return getattr(_STATE, "inside", 0) > 0


@contextlib.contextmanager
def _inside() -> Iterator[None]:
    _STATE.inside = getattr(_STATE, "inside", 0) + 1
    try:
        yield
    finally:
        _STATE.inside -= 1


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _recompute_context(block: nn.Module) -> Iterator[None]:
    """While ``block`` recomputes: its train-mode BNs update throw-away copies of their running
    statistics (the original forward already updated the real ones), and :func:`recomputing`.

    The BN runs exactly as in the original forward (same op, same saved tensors, so the
    checkpoint's recomputation check passes); only the buffers it writes into are copies."""
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training \
                and m.track_running_stats:
            for b in _RUNNING:
                t = m._buffers.get(b)
                if t is not None:
                    swapped.append((m, b, t))
                    m._buffers[b] = t.clone()
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        with _inside():
            yield
    finally:
        _STATE.depth -= 1
        for m, b, t in swapped:
            m._buffers[b] = t


def _needs_checkpoint(block: nn.Module, args: tuple, kwargs: dict) -> bool:
    if not torch.is_grad_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # inside torch.func (grad, vmap): it supports no saved-tensor hooks, which torch's
        # checkpoint needs, so the block runs plain (exact gradients, no saving)
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad
                                                        for p in block.parameters())


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward
    if not _needs_checkpoint(self, args, kwargs):
        return plain(self, *args, **kwargs)
    # RNG replay only matters for random ops; meta tensors (analytic profile) have no values
    meta = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
    return _torch_checkpoint(
        plain, self, *args, use_reentrant=False, preserve_rng_state=not meta,
        context_fn=lambda: (_inside(), _recompute_context(self)), **kwargs)


@dataclass
class CheckpointReport:
    """What :func:`checkpoint_blocks` did: ``blocks`` (names, in model order) and how they
    were chosen (``source``). ``undo()`` restores the plain forwards."""

    blocks: list[str] = field(default_factory=list)
    source: str = ""
    _modules: list[nn.Module] = field(default_factory=list, repr=False)
    _token: object = field(default_factory=object, repr=False, compare=False)

    def undo(self) -> int:
        """Restore the plain forward of the blocks this call wrapped; returns how many. Only
        what this call did: a later :func:`checkpoint_blocks` call replaces the choice, and its
        blocks belong to its own report, so undoing a stale report leaves them checkpointed
        (use :func:`restore_checkpointing` for all)."""
        n = 0
        for m in self._modules:
            if m.__dict__.get(_OWNER) is self._token and _MARK in m.__dict__:
                _release(m)
                n += 1
        self._modules.clear()
        return n

    def __str__(self) -> str:
        shown = ", ".join(self.blocks[:6]) + (", ..." if len(self.blocks) > 6 else "")
        return f"{len(self.blocks)} checkpointed blocks ({self.source}): {shown}"


def _restore(m: nn.Module) -> None:
    """The plain forward again (the owner stays: :func:`resolve_blocks` re-wraps for it)."""
    if m.__dict__.pop(_MARK, None) is not None:
        # a sparse wrapper over it (convpeft.memory.forwards) stays; a block wrapped before the
        # forwards were stacked (an old pickle) has its forward popped as before
        if not remove_forward(m, "checkpoint"):
            m.__dict__.pop("forward", None)


def _release(m: nn.Module) -> None:
    """The plain forward again, owned by no report."""
    _restore(m)
    m.__dict__.pop(_OWNER, None)


def restore_checkpointing(model: nn.Module) -> int:
    """Undo :func:`checkpoint_blocks` on every module of ``model``; returns how many."""
    return undo_marked(model, _MARK, _release)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_container(m: nn.Module) -> bool:
    return any(True for _ in m.children())


def _is_block(m: nn.Module) -> bool:
    """Several layers with parameters (an adapter wrapping one layer is not a block)."""
    return _has_params(m) and _is_container(m) and not hasattr(m, "base_layer")


def _inside_custom(model: nn.Module, name: str) -> bool:
    """Is the module ``name`` nested in a module (below the model) that is not a Sequential?"""
    parts = name.split(".")
    return any(not isinstance(model.get_submodule(".".join(parts[:i])), nn.Sequential)
               for i in range(1, len(parts)))


def detect_blocks(model: nn.Module) -> tuple[list[str], str]:
    """``(names, how)``: the blocks :func:`checkpoint_blocks` picks by default (see the module
    docstring). ``ValueError`` if there is none."""
    stages = []
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Sequential):
        stages.append(f"layer{i}")
        i += 1
    if stages:
        names = [f"{s}.{c}" for s in stages for c, _ in getattr(model, s).named_children()]
        return names, f"children of {', '.join(stages)}"
    best, best_params = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        kids = [c for c in m.children() if _is_block(c)]
        if len(kids) < 2:
            continue
        n = sum(p.numel() for p in m.parameters())
        if n > best_params:
            best, best_params = name, n
    # GoogLeNet / Inception-v3: the largest Sequential of blocks is one branch of an inception
    # module (a custom module that runs its branches side by side, not as a chain), or there is
    # none; their forward runs the model's own children as a chain, so those are the blocks
    # (not a ModuleList, not a Sequential of bare layers such as VGG's)
    if best is None or _inside_custom(model, best):
        top = [c for c, m in model.named_children() if _is_block(m)
               and not isinstance(m, (nn.ModuleList, nn.ModuleDict))
               and not (isinstance(m, nn.Sequential) and not any(map(_is_block, m.children())))]
        if len(top) >= 2:
            return top, "children of the model"
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no nn.Sequential of blocks found (ResNet layer1..N or a "
            "Sequential with at least two container children holding parameters); pass "
            "blocks=[names of submodules], e.g. blocks=['features.1', 'features.2']")
    seq = model.get_submodule(best)
    names = [f"{best}.{c}" if best else c for c, m in seq.named_children() if _is_block(m)]
    return names, f"children of {best or 'the model'}"


def _check_blocks(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    if isinstance(names, str):
        raise TypeError(f"blocks must be a list of module names, not the string {names!r}")
    if not names:
        raise ValueError("blocks is empty: pass names of submodules, or None to auto-detect")
    modules = dict(model.named_modules())
    out = []
    for n in names:
        if n not in modules or n == "":
            close = [k for k in modules if k and (k.startswith(n) or n.startswith(k))][:5]
            raise ValueError(f"no submodule named {n!r} in {type(model).__name__}"
                             + (f" (close: {', '.join(close)})" if close else ""))
        m = modules[n]
        if isinstance(m, _BARE) or hasattr(m, "base_layer") or (
                not _is_container(m) and type(m).__module__.startswith("torch.nn")):
            raise ValueError(f"block {n!r} is a bare {type(m).__name__}: checkpointing one layer "
                             "saves nothing (its input is kept either way); name a block that "
                             "contains several layers")
        if foreign_forward(m):
            raise ValueError(f"block {n!r} already has its forward replaced on the instance "
                             "(by something other than convpeft's techniques); undo that first")
        out.append(m)
    check_distinct_blocks(names, "checkpoint one of them")
    return out


def check_distinct_blocks(names: Sequence[str], fix: str) -> None:
    """``ValueError`` where ``names`` repeats a module or names two nested ones (``fix``: what
    the caller should do instead, e.g. "checkpoint one of them")."""
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ValueError(f"blocks names a module more than once: {', '.join(twice)}")
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"blocks {a!r} and {b!r} are nested: {fix}")


def resolve_blocks(model: nn.Module, blocks: Sequence[str] | None = None
                   ) -> tuple[list[str], str]:
    """``(names, how chosen)`` that :func:`checkpoint_blocks` would wrap, checked, without
    touching the model (``ValueError``/``TypeError`` saying what to change otherwise)."""
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be a list of module names, not the string {blocks!r}")
    names, source = detect_blocks(model) if blocks is None else (list(blocks), "given")
    previous = [(n, m) for n, m in model.named_modules() if _MARK in m.__dict__]
    for _, m in previous:  # checked against the plain model
        _restore(m)
    try:
        _check_blocks(model, names)
    finally:
        for n, m in previous:
            _wrap(m, n)
    return names, source


def _wrap(m: nn.Module, name: str) -> None:
    set_forward(m, "checkpoint", _checkpointed_forward)  # under a sparse wrapper, if any
    setattr(m, _MARK, name)


def checkpoint_blocks(model: nn.Module, *, blocks: Sequence[str] | None = None
                      ) -> CheckpointReport:
    """Run each block of ``model`` under activation checkpointing (see
    :mod:`convpeft.memory.checkpoint`),
    in place and reversibly; outputs, gradients and BN running statistics are those of the
    plain model. ``blocks``: submodule names, or None to auto-detect (ResNet residual blocks,
    else the children of the largest ``nn.Sequential`` of blocks). Calling it again replaces
    the previous choice. On error the model is left as it was.
    """
    names, source = resolve_blocks(model, blocks)
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    report = CheckpointReport(source=source)
    with model_transaction(model):
        restore_checkpointing(model)
        for n in sorted(names, key=order.__getitem__):
            _wrap(modules[n], n)
            setattr(modules[n], _OWNER, report._token)
            report.blocks.append(n)
            report._modules.append(modules[n])
    return report
