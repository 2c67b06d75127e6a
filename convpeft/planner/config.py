"""What the planner plans: configurations (method, rank, lean, checkpointed, sparse) and the models
set up for them.

A :class:`PlanConfig` is one row of the plan before it is evaluated. :func:`expand_configs`
spans them the way the rank sweep does (ranked methods once per rank, the others once, each
plain and/or lean), and :func:`build_configured` builds a fresh model prepared for one of them
with :func:`convpeft.methods.prepare` -- on the meta device by default, so neither weights nor
activations are allocated. The optimizer can be swapped (:data:`OPTIMIZERS`) because its state
is a large part of the peak; GaLore is refused with another one since it brings its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .meta_build import on_meta

DEFAULT_RANKS: tuple[int, ...] = (1, 4, 16)
"""The rank sweep's default ranks."""
OPTIMIZERS: dict[str, str] = {
    "adamw": "AdamW (the methods' default; two state tensors per trainable parameter)",
    "adam": "Adam (same state as AdamW)",
    "sgd": "SGD without momentum (no optimizer state)",
    "sgdm": "SGD with momentum 0.9 (one state tensor per trainable parameter)",
}
LEAN_CHOICES = ("off", "on", "both")
CHECKPOINT_CHOICES = LEAN_CHOICES
_GALORE_OPTIMIZER = ("galore brings its own projected AdamW; use optimizer 'adamw' or drop galore "
                     "from the methods (got optimizer {!r})")

@dataclass(frozen=True)
class PlanConfig:
    """One planned configuration; ``rank`` is None for methods without one; ``checkpoint``:
    the backbone's blocks are checkpointed (:func:`convpeft.checkpoint_blocks`); ``blocks``:
    only the last ``blocks`` blocks train (:mod:`convpeft.memory.sparse`; None: every layer), the
    frozen prefix runs in ``prefix_chunks`` micro-batches."""

    method: str
    rank: int | None
    lean: bool
    checkpoint: bool = False
    blocks: int | None = None
    prefix_chunks: int = 1

    @property
    def label(self) -> str:
        """e.g. ``lora r4 lean ckpt``, ``lora r4 K4 x8`` (last 4 blocks, prefix in 8 chunks) or
        ``full``."""
        r = f" r{self.rank}" if self.rank is not None else ""
        k = f" K{self.blocks}" if self.blocks is not None else ""
        c = f" x{self.prefix_chunks}" if self.prefix_chunks != 1 else ""
        return (f"{self.method}{r}{' lean' if self.lean else ''}"
                f"{' ckpt' if self.checkpoint else ''}{k}{c}")


def _lean_options(lean: bool | str, what: str = "lean") -> tuple[bool, ...]:
    if isinstance(lean, bool):
        return (lean,)
    if lean not in LEAN_CHOICES:
        raise ValueError(f"{what} must be True, False or one of {', '.join(LEAN_CHOICES)} "
                         f"(got {lean!r})")
    return {"off": (False,), "on": (True,), "both": (False, True)}[lean]


def expand_configs(methods: Sequence[str] | None = None,
                   ranks: Sequence[int] | None = DEFAULT_RANKS,
                   lean: bool | str = False, optimizer: str = "adamw",
                   checkpoint: bool | str = False,
                   blocks: Sequence[int | None] | None = None,
                   prefix_chunks: Sequence[int] | None = None) -> list[PlanConfig]:
    """Every (method, rank, lean, checkpoint) to plan: ranked methods once per rank, the others
    once; ``lean`` and ``checkpoint`` take True, False, "off", "on" or "both";
    ``methods=None`` means every registered method (:func:`convpeft.methods.list_methods`),
    less galore when ``optimizer`` is not AdamW (galore brings its own); ``ranks=None`` means
    :data:`DEFAULT_RANKS`. ``blocks`` (K values, None meaning every layer; default ``[None]``)
    and ``prefix_chunks`` (default ``[1]``) span sparse updates: each K with each chunk count
    (chunks only where K is set; ``head`` takes no K >= 1, it is planned once at K=None).
    Duplicates are dropped. ``ValueError`` for an unknown method, a rank below 1, a K below 0 or
    a chunk count below 1, no rank for a ranked method, or galore asked for with another
    optimizer."""
    from convpeft.methods import get_method, list_methods

    default = methods is None
    methods = list(dict.fromkeys(list_methods() if default else methods))
    ranks = list(dict.fromkeys(DEFAULT_RANKS if ranks is None else ranks))
    if not methods:
        raise ValueError(f"no method to plan; name some of {', '.join(list_methods())}")
    for m in methods:
        get_method(m)
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"ranks must be integers >= 1 (got {bad})")
    if optimizer != "adamw" and "galore" in methods:
        if not default:
            raise ValueError(_GALORE_OPTIMIZER.format(optimizer))
        methods.remove("galore")
    ranked = [m for m in methods if get_method(m).ranked]
    if ranked and not ranks:
        raise ValueError(f"no rank given for the ranked method(s) {', '.join(ranked)}")
    blocks = list(dict.fromkeys([None] if blocks is None else blocks))
    chunks = list(dict.fromkeys([1] if prefix_chunks is None else prefix_chunks))
    bad = [k for k in blocks if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                                                    or k < 0)]
    bad += [c for c in chunks if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if bad or not blocks or not chunks:
        raise ValueError(f"blocks must be ints >= 0 or None (every layer) and prefix chunks ints "
                         f">= 1 (got blocks={blocks}, prefix_chunks={chunks})")
    if chunks != [1] and all(k is None for k in blocks):
        # chunks apply to a sparse update's frozen prefix only: without a K they would be
        # dropped silently (MethodConfig and the profiler CLI refuse the same)
        raise ValueError(f"prefix_chunks={chunks} needs blocks (--blocks K): the chunks split "
                         "a sparse update's frozen prefix; add e.g. --blocks all,4 or drop "
                         "--prefix-chunks")
    sparse = [(k, c) for k in blocks for c in (chunks if k is not None else [1])]
    out = []
    for ck in _lean_options(checkpoint, "checkpoint"):
        for le in _lean_options(lean):
            for m in methods:
                for r in (ranks if m in ranked else [None]):
                    for k, c in sparse:
                        if m == "head" and k:  # head only trains no block; K=None covers it
                            k, c = None, 1
                        out.append(PlanConfig(m, r, le, ck, k, c))
    return list(dict.fromkeys(out))


def build_configured(model: str | Callable[[], nn.Module], config: PlanConfig, *,
                     bn: str = "train", optimizer: str = "adamw", num_classes: int = 10,
                     small_input: bool = False, device: str | torch.device = "meta",
                     ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh ``model`` set up for ``config`` in training mode, and its optimizer.

    ``model`` is a torchvision name (:func:`convpeft.models.build_model`, random init) or a
    zero-argument callable returning a fresh ``nn.Module``; either is built under
    ``torch.device(device)`` (``"meta"``: parameters and buffers on the meta device, no memory,
    for :func:`plan` (:func:`~convpeft.planner.meta_build.on_meta`); ``"cpu"`` to run it).
    The method comes from :func:`convpeft.methods.prepare`; ``optimizer`` other than
    ``"adamw"`` replaces the AdamW it builds by the same parameters and learning rate.
    """
    from convpeft.methods import MethodConfig, prepare
    from convpeft.models import build_model

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if optimizer != "adamw" and config.method == "galore":
        raise ValueError(_GALORE_OPTIMIZER.format(optimizer))
    kw: dict[str, Any] = {"rank": config.rank} if config.rank is not None else {}
    cfg = MethodConfig(config.method, bn=bn, lean=config.lean, checkpoint=config.checkpoint,
                       update_blocks=config.blocks, prefix_chunks=config.prefix_chunks, **kw)
    def factory() -> nn.Module:
        return (build_model(model, num_classes, small_input=small_input)
                if isinstance(model, str) else model())

    if torch.device(device).type == "meta":
        # not ``with torch.device("meta")``: that also puts the constructor's own arithmetic
        # on meta (RegNet reads its widths back with .tolist()); see convpeft.planner.meta_build
        net = on_meta(factory)
    else:
        with torch.device(device):
            net = factory()
    if not isinstance(net, nn.Module):
        raise ValueError(f"the model factory must return an nn.Module (got {type(net).__name__})")
    prep = prepare(net, cfg)
    prep.train_mode()
    opt = prep.optimizer
    if optimizer != "adamw":
        params = [p for p in net.parameters() if p.requires_grad]
        lr = cfg.resolved_lr
        opt = {"adam": lambda: torch.optim.Adam(params, lr=lr),
               "sgd": lambda: torch.optim.SGD(params, lr=lr),
               "sgdm": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9)}[optimizer]()
    return net, opt
