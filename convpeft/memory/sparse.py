"""Sparse updates: train only the last K blocks; the frozen prefix runs without a graph, chunked.

:func:`sparse_update` splits a backbone at a block boundary. Everything the model's forward
runs before the first of the last ``update_blocks`` blocks is the **prefix**: it must be frozen
(no parameter with ``requires_grad``), and it then runs under ``torch.no_grad()``, so autograd
records nothing there and backward stops at the first trainable layer. With
``prefix_chunks=N`` the prefix runs its forward in N micro-batches written into one
preallocated boundary activation, which the rest of the model (the **suffix**: the trainable
blocks, the head and whatever runs after the boundary) receives at the full batch: the peak is
no longer set by the stem's activations at the full batch, only by one chunk's.

Blocks (``blocks=None``): those :func:`convpeft.memory.checkpoint.detect_blocks` finds (torchvision
ResNet: ``layer1.0`` ... ``layer4.1``; MobileNetV2/V3, EfficientNet: ``features[i]``), with a
block that is itself an ``nn.Sequential`` of blocks replaced by its blocks (torchvision
EfficientNet's and timm's stages: ``blocks.2.0``, ``blocks.2.1``, ...), in model order; or a
list of module names (see :func:`sparse_blocks`). ``update_blocks=K`` trains the last K;
``K=0`` makes every block prefix (head only, with a graph-free, chunkable backbone).

The prefix is found by a small rule, checked at every forward: walking from the model down to
the first trainable block, the children registered before the path, at each level, in
registration order (ResNet: ``conv1, bn1, relu, maxpool, layer1, layer2, layer3.0`` for
``layer3.1``). The model's forward must run them as a *chain*, each on the previous one's output
(true for torchvision and timm ResNets, MobileNets, EfficientNets): the first runs the whole
chain (chunked), the others pass its result through and raise a ``RuntimeError`` naming the fix
if they are called otherwise.

Batch norm in the prefix (``prefix_bn``):

* ``"eval"`` (default): the prefix's BNs run in eval mode (running statistics, not updated),
  whatever ``model.train()`` set: a frozen prefix is a fixed function, and chunking it is exact.
* ``"model"``: they follow their own mode (batch statistics and running statistics updated in
  train mode), exactly as in the same model without :func:`sparse_update`. Batch statistics of
  a micro-batch are not the full batch's, so ``"model"`` with ``prefix_chunks > 1`` is refused
  where the prefix has a BatchNorm.

Exact: the suffix's outputs, gradients and BN statistics are those of the same frozen-prefix
configuration run plainly (same kernels on the same rows; a conv of a micro-batch computes each
sample as the full batch does, up to the kernel's blocking). Random layers in the prefix
(dropout, stochastic depth) draw per chunk: the same distribution, not the same numbers.
The input must not require a gradient (the prefix has none to give it).

Like :func:`convpeft.lean_activations`, the ``forward`` of each prefix module is swapped on the
instance (``state_dict`` unchanged; survives ``copy.deepcopy``, so the analytic profiler traces
it on the meta device). Lean activations and checkpointing swap forwards too; the three compose
in any order and undo in any order (:mod:`convpeft.memory.forwards`: the sparse wrapper always runs
outside and calls whatever is under it at run time). :meth:`SparseReport.undo` /
:func:`restore_sparse` unwrap the prefix; a stale report leaves a newer split alone.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from convpeft.core.atomic import model_transaction
from convpeft.memory.checkpoint import _is_block, check_distinct_blocks, detect_blocks
from convpeft.memory.forwards import forward_below, remove_forward, set_forward, undo_marked

__all__ = ["PREFIX_BN", "SparseReport", "SparseSplit", "check_sparse", "prefix_bn_follows_mode",
           "restore_sparse", "sparse_blocks", "sparse_split", "sparse_update"]

PREFIX_BN = ("eval", "model")
_MARK = "_convpeft_sparse"  # on a prefix module: (its _Chain, its index, the report's token)
_STATE = threading.local()
# set up front for the importing thread (other threads read the getattr defaults): the state
# then looks the same before and after the first chain ran, and torch.compile, which guards on
# it, compiles the model once instead of again after the first step
_STATE.running = 0
_STATE.pending = None


# ----------------------------------------------------------------------------- the split
def sparse_blocks(model: nn.Module, blocks: Sequence[str] | None = None
                  ) -> tuple[list[str], str]:
    """``(names, how chosen)``: the blocks ``update_blocks`` counts from the end, in model order.

    ``blocks=None``: :func:`convpeft.memory.checkpoint.detect_blocks`'s blocks, each
    ``nn.Sequential``
    among them whose children include blocks replaced by those children (recursively). Or a
    list of submodule names (not nested in one another, each named once). ``ValueError``
    naming the fix otherwise."""
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be a list of module names, not the string {blocks!r}")
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    if blocks is None:
        names, source = detect_blocks(model)
        out: list[str] = []

        def expand(name: str) -> None:
            m = modules[name]
            kids = [(f"{name}.{c}", k) for c, k in m.named_children()]
            if isinstance(m, nn.Sequential) and any(_is_block(k) for _, k in kids):
                for n, _ in kids:
                    expand(n)
            else:
                out.append(name)

        for n in names:
            expand(n)
        if out != names:
            source += ", stages split into their blocks"
        return out, source
    names = list(blocks)
    if not names:
        raise ValueError("blocks is empty: pass names of submodules, or None to auto-detect")
    for n in names:
        if n not in modules or n == "":
            close = [k for k in modules if k and (k.startswith(n) or n.startswith(k))][:5]
            raise ValueError(f"no submodule named {n!r} in {type(model).__name__}"
                             + (f" (close: {', '.join(close)})" if close else ""))
    check_distinct_blocks(names, "name one of them")
    return sorted(names, key=order.__getitem__), "given"


def _before(model: nn.Module, name: str) -> list[str]:
    """The children registered before ``name``'s path, at each level from the model down."""
    chain: list[str] = []
    parent, path = model, ""
    for part in name.split("."):
        for child, _ in parent.named_children():
            if child == part:
                break
            chain.append(f"{path}{child}")
        parent = getattr(parent, part)
        path = f"{path}{part}."
    return chain


@dataclass
class SparseSplit:
    """Where ``update_blocks`` cuts a model: ``blocks`` (all candidates, in order),
    ``trainable_blocks`` (the last K), ``prefix`` (the modules run before the first trainable
    block, as a chain) and ``prefix_params`` (qualified names of every parameter in them)."""

    update_blocks: int
    blocks: list[str]
    trainable_blocks: list[str]
    prefix: list[str]
    prefix_params: set[str]
    source: str

    def in_prefix(self, name: str) -> bool:
        """Is the module or parameter ``name`` in the prefix?"""
        return any(name == p or name.startswith(p + ".") for p in self.prefix)


def sparse_split(model: nn.Module, update_blocks: int, *, blocks: Sequence[str] | None = None
                 ) -> SparseSplit:
    """The :class:`SparseSplit` for training the last ``update_blocks`` blocks (see the module
    docstring); the model is not touched. ``ValueError`` naming the fix for a bad K or block."""
    if isinstance(update_blocks, bool) or not isinstance(update_blocks, int) or update_blocks < 0:
        raise ValueError(f"update_blocks must be an int >= 0 (got {update_blocks!r})")
    names, source = sparse_blocks(model, blocks)
    if update_blocks > len(names):
        raise ValueError(
            f"update_blocks={update_blocks} but {type(model).__name__} has {len(names)} blocks "
            f"({source}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); use at "
            f"most {len(names)}, or pass blocks=[...] naming finer ones")
    if update_blocks == 0:
        prefix = [*_before(model, names[-1]), names[-1]]
    else:
        prefix = _before(model, names[len(names) - update_blocks])
    params = {f"{p}.{n}" for p in prefix
              for n, _ in model.get_submodule(p).named_parameters()}
    return SparseSplit(update_blocks, names, names[len(names) - update_blocks:], prefix,
                       params, source)


# ----------------------------------------------------------------------------- the run
class _Chain:
    """The prefix modules and how to run them; shared by the wrappers of its members."""

    def __init__(self, names: list[str], modules: list[nn.Module], chunks: int, bn: str) -> None:
        self.names = names
        self.modules = modules
        self.chunks = chunks
        self.bn = bn
        self.norms = [b for m in modules for b in m.modules()
                      if isinstance(b, nn.modules.batchnorm._BatchNorm)]

    def plain(self, i: int, *args, **kwargs):
        # whatever runs under the sparse layer now (lean / checkpointing, or the class's
        # forward), looked up per call: an undo of either in any order is seen at once
        return forward_below(self.modules[i], "sparse")(*args, **kwargs)

    def _through(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules:
            x = m(x)  # through __call__: hooks run; the wrapper delegates to plain()
        return x

    def run(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"sparse_update: the prefix's first module {self.names[0]!r} was "
                            "called with other than one tensor; name blocks so that the prefix "
                            "starts where the forward passes a single tensor")
        x = args[0]
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("sparse_update: the input requires a gradient, which the "
                               "graph-free prefix cannot give; call report.undo() "
                               "(convpeft.memory.sparse.restore_sparse(model)) for input gradients")
        _STATE.pending = None
        forced = [b for b in self.norms if b.training] if self.bn == "eval" else []
        for b in forced:
            b.training = False
        _STATE.running = getattr(_STATE, "running", 0) + 1
        try:
            with torch.no_grad():
                n = x.shape[0]
                if self.chunks == 1 or n <= 1:
                    y = self._through(x)
                else:
                    size = math.ceil(n / self.chunks)
                    y = None
                    for a in range(0, n, size):
                        part = self._through(x[a:a + size])
                        if y is None:
                            y = part.new_empty((n, *part.shape[1:]))
                        y[a:a + size].copy_(part)
                        del part
        finally:
            _STATE.running -= 1
            for b in forced:
                b.training = True
        if len(self.modules) > 1:
            _STATE.pending = (self, 1, y)
        return y

    def pass_through(self, i: int, args: tuple, kwargs: dict) -> torch.Tensor:
        pending = getattr(_STATE, "pending", None)
        x = args[0] if len(args) == 1 and not kwargs else None
        if pending is None or pending[0] is not self or pending[1] != i or pending[2] is not x:
            raise RuntimeError(
                f"sparse_update: prefix module {self.names[i]!r} was called with something "
                f"other than {self.names[i - 1]!r}'s output: this model's forward does not run "
                f"its prefix ({', '.join(self.names)}) as a chain in registration order. "
                "Undo sparse_update first (report.undo()), and pass blocks=[...] whose "
                "boundary the forward reaches as a chain")
        _STATE.pending = (self, i + 1, x) if i + 1 < len(self.modules) else None
        return x


def _sparse_forward(self: nn.Module, *args, **kwargs):
    chain, i, _ = self.__dict__[_MARK]
    if getattr(_STATE, "running", 0) > 0:
        return chain.plain(i, *args, **kwargs)
    if i == 0:
        return chain.run(args, kwargs)
    return chain.pass_through(i, args, kwargs)


# ----------------------------------------------------------------------------- the API
@dataclass
class SparseReport:
    """What :func:`sparse_update` did: the split (``update_blocks``, ``trainable_blocks``,
    ``prefix`` modules, ``prefix_params`` count, ``blocks`` and how they were chosen:
    ``source``), ``prefix_chunks`` and ``prefix_bn``. ``undo()`` restores the plain forwards
    (those of lean activations / checkpointing where they are on), only of the modules this
    call wrapped and a later call has not re-wrapped, so a stale report cannot unwrap part of a
    newer split."""

    update_blocks: int
    trainable_blocks: list[str]
    prefix: list[str]
    prefix_params: int
    prefix_chunks: int
    prefix_bn: str
    blocks: list[str] = field(default_factory=list)
    source: str = ""
    _modules: list[nn.Module] = field(default_factory=list, repr=False)
    _token: object = field(default_factory=object, repr=False, compare=False)

    def undo(self) -> int:
        """Unwrap the prefix modules this call wrapped; returns how many. A later
        :func:`sparse_update` call re-wraps the prefix for its own report (it restores every
        module first), so undoing a stale report leaves the newer split whole (use
        :func:`restore_sparse` for all)."""
        n = 0
        for m in self._modules:
            entry = m.__dict__.get(_MARK)
            if entry is not None and entry[2] is self._token:
                _restore(m)
                n += 1
        self._modules.clear()
        return n

    def __str__(self) -> str:
        shown = ", ".join(self.trainable_blocks[:4]) + (
            ", ..." if len(self.trainable_blocks) > 4 else "")
        return (f"last {self.update_blocks} of {len(self.blocks)} blocks train ({shown or 'none'}"
                f"); frozen prefix of {len(self.prefix)} modules, {self.prefix_params:,} params, "
                f"no graph, {self.prefix_chunks} chunk(s), BN {self.prefix_bn}")


def _restore(m: nn.Module) -> None:
    if m.__dict__.pop(_MARK, None) is not None:
        remove_forward(m, "sparse")  # what runs under it (lean, checkpointing) stays


def restore_sparse(model: nn.Module) -> int:
    """Undo :func:`sparse_update` on every module of ``model``; returns how many."""
    return undo_marked(model, _MARK, _restore)


def sparse_update(model: nn.Module, update_blocks: int, *, blocks: Sequence[str] | None = None,
                  prefix_chunks: int = 1, prefix_bn: str = "eval") -> SparseReport:
    """Run everything before the last ``update_blocks`` blocks of ``model`` without a graph, in
    ``prefix_chunks`` micro-batches (see :mod:`convpeft.memory.sparse`), in place and reversibly.

    The prefix must already be frozen (:func:`convpeft.methods.prepare` with
    ``MethodConfig(update_blocks=K)`` freezes it and puts adapters only after it). ``blocks``:
    the candidate blocks (None: detected). ``prefix_bn``: ``"eval"`` (frozen running statistics,
    default) or ``"model"`` (as the model's mode says; not chunked). Calling it again replaces
    the previous split. On error the model is left as it was."""
    split = sparse_split(model, update_blocks, blocks=blocks)
    check_sparse(model, split, prefix_chunks=prefix_chunks, prefix_bn=prefix_bn)
    params = dict(model.named_parameters())
    modules = [model.get_submodule(n) for n in split.prefix]
    report = SparseReport(update_blocks, split.trainable_blocks, split.prefix,
                          sum(params[n].numel() for n in split.prefix_params), prefix_chunks,
                          prefix_bn, split.blocks, split.source)
    with model_transaction(model):
        restore_sparse(model)
        if modules:
            chain = _Chain(split.prefix, modules, prefix_chunks, prefix_bn)
            for i, m in enumerate(modules):
                set_forward(m, "sparse", _sparse_forward)
                m.__dict__[_MARK] = (chain, i, report._token)
                report._modules.append(m)
    return report


@contextlib.contextmanager
def prefix_bn_follows_mode(model: nn.Module) -> Iterator[None]:
    """While inside, the BNs in every sparse-wrapped prefix of ``model`` follow their own mode
    (as under ``prefix_bn="model"``) instead of being held in eval mode: what
    :func:`convpeft.train.adapt_prefix_bn` needs to re-estimate them after :func:`prepare`."""
    chains = {id(e[0]): e[0] for m in model.modules()
              if (e := m.__dict__.get(_MARK)) is not None}
    saved = [(c, c.bn) for c in chains.values()]
    for c, _ in saved:
        c.bn = "model"
    try:
        yield
    finally:
        for c, bn in saved:
            c.bn = bn


def check_sparse(model: nn.Module, split: SparseSplit, *, prefix_chunks: int = 1,
                 prefix_bn: str = "eval", frozen: bool = True) -> None:
    """Refuse what :func:`sparse_update` would refuse for ``split`` of ``model``, touching
    nothing: bad ``prefix_chunks`` / ``prefix_bn``, ``prefix_bn="model"`` chunked over a
    BatchNorm, and (``frozen=True``) a prefix parameter that trains.
    :func:`convpeft.methods.prepare` calls it with ``frozen=False`` before its setup (which
    freezes the prefix), so a bad combination fails before the model changes."""
    if isinstance(prefix_chunks, bool) or not isinstance(prefix_chunks, int) or prefix_chunks < 1:
        raise ValueError(f"prefix_chunks must be an int >= 1 (got {prefix_chunks!r})")
    if prefix_bn not in PREFIX_BN:
        raise ValueError(f"prefix_bn must be one of {', '.join(PREFIX_BN)} (got {prefix_bn!r})")
    if frozen:
        params = dict(model.named_parameters())
        training = sorted(n for n in split.prefix_params if params[n].requires_grad)
        if training:
            raise ValueError(
                f"sparse_update: {len(training)} parameters of the frozen prefix train "
                f"({', '.join(training[:4])}{', ...' if len(training) > 4 else ''}); freeze "
                "them (requires_grad_(False)) or use MethodConfig(..., update_blocks=K), which "
                "trains only the last K blocks")
    if prefix_bn == "model" and prefix_chunks > 1 and any(
            isinstance(b, nn.modules.batchnorm._BatchNorm)
            for n in split.prefix for b in model.get_submodule(n).modules()):
        raise ValueError(
            "prefix_bn='model' with prefix_chunks > 1: the prefix has BatchNorm, and a "
            "micro-batch's statistics are not the full batch's (not exact); use "
            "prefix_bn='eval' (frozen running statistics) or prefix_chunks=1")
