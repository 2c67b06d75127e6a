"""Training: pretrain a source model once (cached), fine-tune it with a method, evaluate.

* :func:`pretrain` trains the source model on ``task.source_train`` and caches its weights under
  ``$CONVPEFT_CACHE`` (default ``$XDG_CACHE_HOME/convpeft``, i.e. ``~/.cache/convpeft``), keyed by
  a hash of everything the weights depend on (recipe, task and a fingerprint of its source
  data, seed, torch version, the thread count and the CPU's SIMD level or GPU that ran it); a
  cache hit loads instead of training. Pretraining runs under :func:`deterministic_torch`.
* :func:`finetune` adapts a copy of a model to ``task.target_train`` with a method from
  :mod:`convpeft.methods` and measures zero-shot (before any update), target and source accuracy.
* :func:`evaluate` is top-1 accuracy.

Runs are repeatable on the CPU for a seed (parameter init, adapter init, shuffling, augmentation
all come from seeded generators). Pretraining goes further (:func:`deterministic_torch`):
deterministic algorithms where torch has them and a fixed intra-op thread count
(``PRETRAIN_DEFAULTS["threads"]``, restored afterwards), inside a forked RNG so a cache hit and
a miss leave the caller's global RNG alike. The same torch, thread count and CPU kind
(``torch.backends.cpu.get_cpu_capability()``) then give bit-identical source weights
(``pretrain_info["weights_sha256"]`` says so); another CPU model may round differently in its
vectorised kernels, and training amplifies that, so accuracies agree across machines only
within their seed intervals while FLOPs and memory agree exactly.
CUDA is used when available unless ``device`` says otherwise.

Mixed precision (``finetune(..., amp="bf16"|"fp16")``, :mod:`convpeft.core.amp`): forward and loss
under ``torch.autocast``, fp32 master weights and optimizer state; fp16 (CUDA only) scales the
loss with a ``GradScaler``. Pretraining and evaluation stay fp32 (the cached source weights do
not depend on how they are later fine-tuned; accuracy is that of the fp32 weights).

One concept per module, all re-exported here: :mod:`~convpeft.train.determinism`
(:func:`deterministic_torch`, :func:`state_dict_sha256`), :mod:`~convpeft.train.cache` (where
source weights are cached and what their key hashes), :mod:`~convpeft.train.loop` (one epoch of
steps, shared by both), :mod:`~convpeft.train.evaluation`, :mod:`~convpeft.train.pretraining`
:mod:`~convpeft.train.finetuning`, :mod:`~convpeft.train.schedule` (warm-up + cosine) and
:mod:`~convpeft.train.lr_search` (:func:`select_lr`: a method's rate chosen on a validation
split).
"""

from .batchnorm import adapt_prefix_bn, recalibrate_bn, snapshot_bn
from .cache import resolve_cache_dir
from .determinism import deterministic_torch, state_dict_sha256
from .evaluation import evaluate
from .finetuning import MEMORY_FORMATS, FinetuneResult, finetune, resolve_memory_format
from .loop import default_device
from .lr_search import LrSearch, select_lr
from .pretraining import PRETRAIN_DEFAULTS, pretrain

__all__ = [
    "PRETRAIN_DEFAULTS",
    "adapt_prefix_bn",
    "FinetuneResult",
    "LrSearch",
    "resolve_cache_dir",
    "default_device",
    "deterministic_torch",
    "evaluate",
    "recalibrate_bn",
    "snapshot_bn",
    "finetune",
    "resolve_memory_format",
    "MEMORY_FORMATS",
    "pretrain",
    "select_lr",
    "state_dict_sha256",
]
