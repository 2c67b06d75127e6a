"""Fine-tuning methods: which parameters train, how, and what batch norm does meanwhile.

=========  ==================================================================================
method     trains
=========  ==================================================================================
full       every parameter (AdamW)
head       the classifier only (linear probe; AdamW)
bitfit     every bias + the classifier (AdamW). torchvision's convs that a BN follows have
           ``bias=False``, so the backbone's biases are mostly the BN biases (shifts); BN
           scales stay frozen. Other biases train too (MobileNetV3's squeeze-excitation
           1x1 convs and hidden classifier Linear).
lora       low-rank adapters on the ``target`` convs (:func:`convpeft.apply_adapters`) + the
           classifier (+ BN affine under ``bn="train"``); AdamW over those
lora-fa    as lora with ``A`` frozen (LoRA-FA): half the adapter trains, and a conv saves
           ``A x`` instead of ``x`` for backward where that is smaller; ``A`` is set along each
           layer's principal input directions on the training data before the first step
           (``fa_init="data"``, :mod:`convpeft.adapters.lora_fa`) or kept at its random draw
dora       as lora, with weight-decomposed (magnitude/direction) adapters
galore     every parameter; :func:`convpeft.optim.galore_optimizer` projects the ``target``
           convs' gradients to rank ``rank`` (AdamW state in the projected space), plain AdamW
           for the rest
=========  ==================================================================================

Batch-norm policy (``MethodConfig.bn``), applied on top of the method:

* ``"train"`` (default): BN in train mode (batch statistics; running stats updated) and BN
  affine parameters trainable where the method trains backbone weights (full, galore, lora,
  dora; bitfit trains the BN biases, head none). The usual fine-tuning setting.
* ``"freeze"``: BN in eval mode (running statistics, not updated) and BN affine frozen, for
  every method (bitfit then trains only non-BN biases + head). BN becomes a fixed per-channel
  affine map, so backward saves no activations for batch statistics: the cheapest option.
* ``"stats"``: AdaBN. BN affine frozen; running statistics are reset by :func:`prepare` and
  re-estimated on the target data as a cumulative average (``momentum=None``) while training.

Sparse updates (``MethodConfig.update_blocks=K``, :mod:`convpeft.memory.sparse`): any method trains
only what runs from the last K blocks of the backbone on (adapters, BN affine, biases or every
weight there, and the head); the prefix before them is frozen, runs without a graph and, with
``prefix_chunks=N``, in N micro-batches. Its BNs stay in eval mode with the source model's
running statistics (``prefix_bn="eval"``, even under ``bn="stats"``; with
``prefix_stats="target"`` those statistics are first re-estimated on the training data and
frozen again), or follow ``bn`` (``prefix_bn="model"``, unchunked only).

``model.train()`` puts every BN back in train mode, so the loop must call :func:`set_bn_mode`
(or :meth:`PreparedMethod.train_mode`) after it; :func:`convpeft.train.finetune` does.
"""

from .config import BN_POLICIES, DEFAULT_BN, FA_INITS, PREFIX_STATS, MethodConfig
from .prepare import PreparedMethod, bn_modules, count_trainable, prepare, set_bn_mode
from .registry import MethodSpec, get_method, list_methods, register_method

__all__ = [
    "BN_POLICIES",
    "DEFAULT_BN",
    "FA_INITS",
    "PREFIX_STATS",
    "MethodConfig",
    "MethodSpec",
    "PreparedMethod",
    "bn_modules",
    "count_trainable",
    "get_method",
    "list_methods",
    "prepare",
    "register_method",
    "set_bn_mode",
]
